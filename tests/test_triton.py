"""The Triton kernels against torch: every option, dtype and layout.

On a machine with a CUDA GPU the kernels run compiled on it; elsewhere (CI) they run on
CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1``, set by conftest before
triton is imported; the launchers are called directly, so other tests' CPU tensors keep
their own path). Expected values come from torch: ``F.nll_loss`` /
``F.cross_entropy`` in float64 on the same (rounded) inputs, and for label smoothing on
log-probabilities torch's cross-entropy smoothing formula written out in float64 torch
operations, differentiated by torch's autograd. For z_loss and softcap the oracle is
``F.cross_entropy`` on ``c * tanh(x / c)`` plus ``z * torch.logsumexp(...)**2``; for
probability targets ``F.cross_entropy`` with probabilities (from logits) or
``-sum_c w_c p'_c x_c`` written out (log-probabilities).
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import types
import zlib

import pytest
import torch
import torch.nn.functional as F

import nllloss
from nllloss import _validate
from nllloss._builder import build
from nllloss._kernels import triton as triton_kernels
from nllloss._options import Options, declaration, option

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
if not CUDA:
    # conftest sets it before anything imports triton, which reads it then (this line
    # serves runs without conftest)
    os.environ["TRITON_INTERPRET"] = "1"
launch = triton_kernels.load()
# The environment switch that lets the torch operators pick the kernels for DEVICE tensors
OPT_IN = ("NLLLOSS_TRITON", "1") if CUDA else ("NLLLOSS_TRITON_INTERPRET", "1")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (rtol, atol) of a result against the float64 oracle on the same rounded inputs
TOLERANCE = {
    torch.float32: (2e-5, 2e-6),
    torch.bfloat16: (1.6e-2, 1e-5),
    torch.float16: (2e-3, 1e-6),
}


def _problem(x, target, weight, ignore_index, reduction, **options):
    """The Problem of these arguments, as nllloss.nll_loss builds it (``total_weight``, the
    'mean' denominator, only with 'mean': the tests pass one option set to every reduction)."""
    if reduction != "mean":
        options.pop("total_weight", None)
    return build(x, target, weight, ignore_index, reduction, options)[1]


def _forward(*arguments, **options):
    return launch.forward(_problem(*arguments, **options))


def _backward(grad_output, *arguments, saved=None, **options):
    return launch.backward(_problem(*arguments, **options), grad_output, saved)


def _forward_backward(*arguments, **options):
    return launch.forward_backward(_problem(*arguments, **options))


@pytest.fixture(autouse=True)
def numpy_engine():
    """Overrides conftest's: the NumPy engines play no part here, one run per test."""
    return None


def test_kernels_are_served(monkeypatch):
    """The kernels loaded (a missing triton fails here rather than skipping everything)."""
    assert launch is not None
    monkeypatch.setenv(*OPT_IN)
    x = torch.zeros(2, 3, device=DEVICE)
    t = torch.zeros(2, dtype=torch.int64, device=DEVICE)
    assert triton_kernels.launcher_for(_fake_problem(x, t)) is launch
    if CUDA:  # asked for by name: what the kernels do not compute is refused
        with pytest.raises(ValueError, match=r"which do not compute input dtype torch\.float64"):
            triton_kernels.launcher_for(_fake_problem(x.double(), t))
    else:  # the interpreter switch: another engine computes it
        assert triton_kernels.launcher_for(_fake_problem(x.double(), t)) is None


def _input(layout: str, dtype, from_logits: bool, generator):
    """(x on DEVICE in dtype, target (int64, some ignored), weight, classes)."""
    shapes = {
        "2d": (37, 11),
        "kdim": (3, 7, 5, 4),
        "unbatched": (9,),
        "class-strided-2d": (13, 6),
        "channels-last": (2, 5, 3, 4),
    }
    shape = shapes[layout]
    classes = shape[0] if len(shape) == 1 else shape[1]
    logits = torch.randn(shape, generator=generator, dtype=torch.float64) * 3
    x = logits if from_logits else torch.log_softmax(logits, dim=0 if len(shape) == 1 else 1)
    x = x.to(dtype)
    if layout == "class-strided-2d":
        x = x.t().contiguous().t()  # class axis stride N
        assert x.stride(1) != 1
    if layout == "channels-last":
        x = x.contiguous(memory_format=torch.channels_last)
        assert x.stride(1) == 1
    target_shape = () if len(shape) == 1 else (shape[0], *shape[2:])
    target = torch.randint(0, classes, target_shape, generator=generator)
    if target.dim():
        target.view(-1)[::4] = -100
    weight = torch.rand(classes, generator=generator, dtype=torch.float64) + 0.25
    return x.to(DEVICE), target.to(DEVICE), weight.to(dtype).to(DEVICE), classes


def _reference(x, target, weight, reduction, from_logits, label_smoothing, total_weight=None):
    """float64 loss (with autograd) from torch: cross_entropy, or nll_loss plus torch's
    smoothing term on the given log-probabilities."""
    x64 = x.detach().cpu().double().contiguous().requires_grad_()
    t = target.cpu().long()
    w = None if weight is None else weight.cpu().double()
    # total_weight replaces the 'mean' denominator: the sum divided by it
    red = "sum" if total_weight is not None else reduction
    if from_logits:
        loss = F.cross_entropy(x64, t, weight=w, reduction=red, label_smoothing=label_smoothing)
    else:
        loss = F.nll_loss(x64, t, weight=w, reduction=red)
        if label_smoothing:
            classes = x64.shape[0] if x64.dim() == 1 else x64.shape[1]
            axis = 0 if x64.dim() == 1 else 1
            shape = [1] * x64.dim()
            shape[axis] = classes
            w_all = torch.ones(classes, dtype=torch.float64) if w is None else w
            ignored = t == -100
            smooth = torch.where(ignored, 0.0, -(x64 * w_all.view(shape)).sum(axis))
            if red == "mean":
                counted = t[~ignored]
                smooth = smooth.sum() / (w_all[counted].sum() if w is not None else counted.numel())
            elif red == "sum":
                smooth = smooth.sum()
            loss = (1 - label_smoothing) * loss + smooth * (label_smoothing / classes)
    if total_weight is not None:
        loss = loss / float(total_weight)
    return x64, loss


def _close(actual, expected, dtype):
    rtol, atol = TOLERANCE[dtype]
    torch.testing.assert_close(
        actual.detach().cpu().double(), expected.detach().double(), rtol=rtol, atol=atol
    )


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.3])
@pytest.mark.parametrize("from_logits", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["2d", "kdim", "unbatched", "class-strided-2d", "channels-last"])
def test_matches_torch(layout, dtype, from_logits, label_smoothing, weighted, reduction, request):
    generator = torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))
    x, target, weight, _ = _input(layout, dtype, from_logits, generator)
    weight = weight if weighted else None
    options = {"from_logits": from_logits, "label_smoothing": label_smoothing}
    loss, saved = _forward(x, target, weight, -100, reduction, **options)
    x64, expected = _reference(x, target, weight, reduction, from_logits, label_smoothing)
    assert loss.dtype == dtype
    assert loss.shape == expected.shape
    _close(loss, expected, dtype)

    upstream = torch.rand(expected.shape, generator=generator, dtype=torch.float64) + 0.5
    expected.backward(upstream, retain_graph=True)
    g = upstream.to(dtype).to(DEVICE)
    grad = _backward(g, x, target, weight, -100, reduction, **options, saved=saved)
    assert grad.dtype == dtype
    assert grad.shape == x.shape
    _close(grad, x64.grad, dtype)
    # recomputed without what the forward saved: the same bits
    again = _backward(g, x, target, weight, -100, reduction, **options)
    assert torch.equal(grad, again)
    # written during the forward for grad_output = 1
    loss_fused, fused = _forward_backward(x, target, weight, -100, reduction, **options)
    assert torch.equal(loss_fused, loss)
    ones = torch.ones(expected.shape, dtype=dtype, device=DEVICE)
    assert torch.equal(fused, _backward(ones, x, target, weight, -100, reduction, **options))
    x64.grad = None
    expected.backward(torch.ones_like(expected))
    _close(fused, x64.grad, dtype)


def test_many_class_and_position_blocks(monkeypatch):
    """Tiles smaller than the rows: the class loop, the online log-sum-exp across blocks,
    masked tails, and many partial sums added by the final reduction."""
    from nllloss._kernels.triton import _launch

    for name in ("_TILE", "_TILE_INTERPRETED", "_GATHER_ROWS"):
        monkeypatch.setattr(_launch, name, 64)
    monkeypatch.setattr(_launch, "_STRIDED_CLASS_BLOCK", 8)
    monkeypatch.setattr(_launch, "_FINISH_BLOCK", 4)
    generator = torch.Generator().manual_seed(5)
    for shape in [(9, 200), (2, 21, 13)]:
        x = (torch.randn(shape, generator=generator) * 4).to(DEVICE)
        target = torch.randint(0, shape[1], (shape[0], *shape[2:]), generator=generator)
        target.view(-1)[::5] = -100
        weight = torch.rand(shape[1], generator=generator).to(DEVICE) + 0.5
        target = target.to(DEVICE)
        for from_logits in (False, True):
            for reduction in ("none", "mean", "sum"):
                options = {"from_logits": from_logits, "label_smoothing": 0.2}
                loss, _ = _forward(x, target, weight, -100, reduction, **options)
                x64, expected = _reference(x, target, weight, reduction, from_logits, 0.2)
                _close(loss, expected, torch.float32)
                expected.backward(torch.ones_like(expected))
                ones = torch.ones(expected.shape, device=DEVICE)
                grad = _backward(ones, x, target, weight, -100, reduction, **options)
                _close(grad, x64.grad, torch.float32)


def _bits(tensor):
    """The bit patterns (the sign of zero included)."""
    integer = {2: torch.int16, 4: torch.int32}[tensor.element_size()]
    return tensor.contiguous().view(integer)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["2d", "kdim", "class-strided-2d"])
def test_bitwise_equal_to_torch_where_the_order_allows(layout, dtype):
    """One product per element: the 'none' loss, and the gradient for 'none', 'sum' and
    unweighted 'mean', are torch's bits on the same device."""
    generator = torch.Generator().manual_seed(11)
    x, target, weight, _ = _input(layout, dtype, False, generator)
    for w in (None, weight):
        expected = F.nll_loss(x, target, weight=w, reduction="none")
        loss, _ = _forward(x, target, w, -100, "none")
        assert torch.equal(_bits(loss), _bits(expected))
        for reduction in ("none", "sum", "mean"):
            if reduction == "mean" and w is not None:
                continue  # torch adds the weights in its own order
            leaf = x.detach().clone().requires_grad_()
            out = F.nll_loss(leaf, target, weight=w, reduction=reduction)
            g = torch.rand(out.shape, generator=generator).to(dtype).to(DEVICE) + 0.5
            out.backward(g)
            grad = _backward(g, x, target, w, -100, reduction)
            assert torch.equal(_bits(grad), _bits(leaf.grad)), reduction


@pytest.mark.parametrize(
    ("dtype", "ignore_index"),
    [
        (torch.int64, -100),
        (torch.int32, 3),  # a class index that is ignored
        (torch.int32, 2**40),  # outside int32: nothing is ignored
        (torch.int16, -1),
        (torch.uint8, 255),
        (torch.int8, -100),
    ],
    ids=str,
)
def test_target_dtypes(dtype, ignore_index):
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(40, 6, generator=generator).to(DEVICE)
    target = torch.randint(0, 6, (40,), generator=generator)
    if ignore_index < 2**31 and (ignore_index >= 0 or dtype != torch.uint8):
        target[::3] = ignore_index
    for reduction in ("none", "mean", "sum"):
        for from_logits in (False, True):
            loss, _ = _forward(
                x, target.to(dtype).to(DEVICE), None, ignore_index, reduction,
                from_logits=from_logits,
            )  # fmt: skip
            function = F.cross_entropy if from_logits else F.nll_loss
            torch_ignore = ignore_index if ignore_index < 2**31 else -100
            expected = function(
                x.cpu().double(), target, ignore_index=torch_ignore, reduction=reduction
            )
            _close(loss, expected, torch.float32)


def test_strided_target_and_weight():
    generator = torch.Generator().manual_seed(9)
    x = torch.randn(12, 7, 3, generator=generator).to(DEVICE)
    target = torch.randint(0, 7, (12, 6), generator=generator).to(DEVICE)[:, ::2]
    weight = torch.rand(14, generator=generator, dtype=torch.float64).to(DEVICE)[::2]
    assert not target.is_contiguous()
    assert not weight.is_contiguous()
    for from_logits in (False, True):
        loss, _ = _forward(x, target, weight, -100, "none", from_logits=from_logits)
        _, expected = _reference(x, target, weight.float(), "none", from_logits, 0.0)
        _close(loss, expected, torch.float32)


def _kdim_case(seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = (torch.randn(6, 9, 5, 7, generator=generator) * 2).to(torch.bfloat16).to(DEVICE)
    target = torch.randint(0, 9, (6, 5, 7), generator=generator)
    target[:, 1, ::2] = -100
    weight = (torch.rand(9, generator=generator) + 0.5).to(DEVICE)
    return x, target.to(DEVICE), weight


def test_twenty_runs_are_bitwise_equal_in_deterministic_mode():
    x, target, weight = _kdim_case()
    wide = (torch.randn(33, 2000, generator=torch.Generator().manual_seed(1)) * 3).to(DEVICE)
    wide_target = torch.randint(0, 2000, (33,)).to(DEVICE)
    cases = [
        (x, target, weight, {"label_smoothing": 0.1}),
        (x, target, weight, {"from_logits": True, "label_smoothing": 0.1}),
        (wide, wide_target, None, {"from_logits": True}),
    ]
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        for x_, t_, w_, options in cases:
            runs = []
            for _ in range(20):
                loss, saved = _forward(x_, t_, w_, -100, "mean", **options)
                g = torch.ones((), device=DEVICE)
                grad = _backward(g, x_, t_, w_, -100, "mean", **options, saved=saved)
                runs.append((loss, grad))
            for loss, grad in runs[1:]:
                assert torch.equal(loss, runs[0][0])
                assert torch.equal(grad, runs[0][1])
    finally:
        torch.use_deterministic_algorithms(previous)


@pytest.mark.parametrize("from_logits", [False, True])
def test_any_split_of_the_batch_with_a_global_total_weight(from_logits):
    """Micro-batches that divide by the whole batch's denominator add up to its loss, and
    their gradients are the whole batch's, bit for bit."""
    x, target, weight = _kdim_case(seed=2)
    x = x.float()
    valid = target != -100
    total = weight[target[valid]].sum()  # the global denominator, from the targets
    options = {"from_logits": from_logits, "label_smoothing": 0.1, "total_weight": total}
    whole, saved = _forward(x, target, weight, -100, "mean", **options)
    one = torch.ones((), device=DEVICE)
    whole_grad = _backward(one, x, target, weight, -100, "mean", **options, saved=saved)
    for bounds in ([0, 1, 6], [0, 2, 3, 6], [0, 5, 6], list(range(7))):
        losses, grads = [], []
        for start, stop in itertools.pairwise(bounds):
            piece = (x[start:stop], target[start:stop], weight, -100, "mean")
            loss, saved = _forward(*piece, **options)
            losses.append(loss.double())
            grads.append(_backward(one, *piece, **options, saved=saved))
        torch.testing.assert_close(sum(losses), whole.double(), rtol=1e-6, atol=0)
        assert torch.equal(torch.cat(grads), whole_grad)
    # the float64 oracle, for the whole batch with the given denominator
    _, expected = _reference(x, target, weight, "mean", from_logits, 0.1, total_weight=total)
    _close(whole, expected, torch.float32)
    # without total_weight the denominator is the same sum of w[t]: the same loss
    local, _ = _forward(x, target, weight, -100, "mean", from_logits=from_logits,
                              label_smoothing=0.1)  # fmt: skip
    torch.testing.assert_close(local, whole, rtol=1e-6, atol=0)


def test_total_weight_replaces_the_mean_denominator():
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(30, 8, generator=generator).to(DEVICE)
    target = torch.randint(0, 8, (30,), generator=generator).to(DEVICE)
    givens = [
        (7.5, 7.5),
        (7.5, torch.tensor(7.5, device=DEVICE)),
        (7.5, torch.tensor([7.5], dtype=torch.float64)),  # one element, on the CPU
        (41, torch.tensor(41)),  # a count, as nllloss.total_weight gives without weight
    ]
    for value, given in givens:
        for from_logits in (False, True):
            loss, saved = _forward(
                x, target, None, -100, "mean", from_logits=from_logits, total_weight=given
            )
            x64, expected = _reference(x, target, None, "mean", from_logits, 0.0, value)
            _close(loss, expected, torch.float32)
            assert float(saved.denominator) == value
            expected.backward()
            grad = _backward(
                torch.ones((), device=DEVICE), x, target, None, -100, "mean",
                from_logits=from_logits, total_weight=given,
            )  # fmt: skip
            _close(grad, x64.grad, torch.float32)


@pytest.mark.parametrize("from_logits", [False, True])
def test_out_of_range_targets_raise_the_core_error(from_logits):
    x = torch.zeros(5, 4, device=DEVICE)
    target = torch.tensor([0, 1, 7, 2, -3], device=DEVICE)
    message = str(_validate.out_of_bounds_error(7, (2,), 4, -100))
    for reduction in ("none", "mean", "sum"):
        with pytest.raises(IndexError) as raised:
            _forward(x, target, None, -100, reduction, from_logits=from_logits)
        assert str(raised.value) == message
        with pytest.raises(IndexError) as raised:
            _backward(torch.ones(()), x, target, None, -100, reduction)
        assert str(raised.value) == message
    kdim = torch.zeros(2, 3, 4, 5, device=DEVICE)
    kdim_target = torch.zeros(2, 4, 5, dtype=torch.int32, device=DEVICE)
    kdim_target[1, 2, 3] = 3
    kdim_target[1, 3, 0] = -1
    with pytest.raises(IndexError) as raised:
        _forward(kdim, kdim_target, None, -100, "mean", from_logits=from_logits)
    assert str(raised.value) == str(_validate.out_of_bounds_error(3, (1, 2, 3), 3, -100))
    with pytest.raises(IndexError, match=r"target\[\] = 4 is not in the class range \[0, 4\)"):
        _forward(x[0], target[4:].abs() + 1, None, -100, "mean")


@pytest.mark.parametrize("from_logits", [False, True])
def test_unchecked_out_of_range_targets_give_nan(from_logits):
    generator = torch.Generator().manual_seed(8)
    x = torch.randn(6, 5, generator=generator).to(DEVICE)
    target = torch.tensor([0, 9, 2, -100, -2, 4], device=DEVICE)
    bad = torch.tensor([False, True, False, False, True, False], device=DEVICE)
    options = {"from_logits": from_logits, "check_targets": False, "label_smoothing": 0.1}
    per_row, _ = _forward(x, target, None, -100, "none", **options)
    assert torch.isnan(per_row[bad]).all()
    good = torch.where(bad, -100, target)
    expected, _ = _forward(x, good, None, -100, "none", **options)
    assert torch.equal(per_row[~bad], expected[~bad])
    for reduction in ("mean", "sum"):
        loss, _ = _forward(x, target, None, -100, reduction, **options)
        assert torch.isnan(loss)
        one = torch.ones((), device=DEVICE)
        grad = _backward(one, x, target, None, -100, reduction, **options)
        assert torch.isnan(grad[bad]).all()
        assert torch.isfinite(grad[~bad]).all()


def test_offsets_beyond_two_to_the_31():
    """Elements past 2**31 are read where they are (a 32-bit offset would wrap). The
    input is 6 GiB of untouched memory on the CPU (pages are never written)."""
    classes = 2**30
    x = torch.empty((3, classes), dtype=torch.float16, device=DEVICE)
    target = torch.tensor([5, classes - 1, 7], device=DEVICE)
    x[0, 5], x[1, classes - 1], x[2, 7] = -1.0, -2.0, -4.0
    loss, _ = _forward(x, target, None, -100, "none")
    assert loss.tolist() == [1.0, 2.0, 4.0]
    loss, _ = _forward(x, target, None, -100, "sum")
    assert float(loss) == 7.0


@pytest.mark.skipif(not CUDA, reason="the gradient over 2**31 elements needs a GPU's memory")
def test_gradient_beyond_two_to_the_31():
    rows, classes = 2**17 + 1, 2**14  # 2**31 + 2**14 elements: the last row lies past 2**31
    generator = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn((rows, classes), dtype=torch.bfloat16, device=DEVICE, generator=generator)
    target = torch.randint(0, classes, (rows,), device=DEVICE, generator=generator)
    loss, saved = _forward(x, target, None, -100, "none", from_logits=True)
    last = slice(rows - 3, rows)
    lse = torch.logsumexp(x[last].double(), dim=1)
    expected = lse - x[last].double().gather(1, target[last, None]).squeeze(1)
    torch.testing.assert_close(loss[last].double(), expected, rtol=1.6e-2, atol=0)
    grad = _backward(
        torch.ones(rows, device=DEVICE), x, target, None, -100, "none",
        from_logits=True, saved=saved,
    )  # fmt: skip
    p = torch.softmax(x[last].double(), dim=1)
    p[torch.arange(3), target[last]] -= 1
    torch.testing.assert_close(grad[last].double(), p, rtol=1.6e-2, atol=1e-6)


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
def test_unchecked_loss_is_captured_in_a_cuda_graph():
    x, target, weight = _kdim_case(seed=6)
    options = {"from_logits": True, "label_smoothing": 0.1, "check_targets": False}
    one = torch.ones((), device=DEVICE)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up: compile outside the capture
        loss, saved = _forward(x, target, weight, -100, "mean", **options)
        _backward(one, x, target, weight, -100, "mean", **options, saved=saved)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss, saved = _forward(x, target, weight, -100, "mean", **options)
        grad = _backward(one, x, target, weight, -100, "mean", **options, saved=saved)
    graph.replay()
    eager, _ = _forward(x, target, weight, -100, "mean", **options)
    assert torch.equal(loss, eager)
    eager_grad = _backward(one, x, target, weight, -100, "mean", **options)
    assert torch.equal(grad, eager_grad)


def _fake_problem(x, target):
    """What launcher_for and supports read of a problem (x may only look like a tensor)."""
    probabilities = target.dtype.is_floating_point
    return types.SimpleNamespace(
        input=x, target=target, weight=None, options=Options(), probabilities=probabilities
    )


@declaration
@dataclasses.dataclass(frozen=True)
class _Canary(Options):
    """The declaration with one more option, which no engine declares it computes."""

    canary: float = option(0.0, lambda value, options, context: value)


def _cuda_looking(dtype=torch.float32):
    """What launcher_for reads of a tensor, as a CUDA tensor would show it."""
    device = types.SimpleNamespace(type="cuda")
    return types.SimpleNamespace(device=device, dtype=dtype, numel=lambda: 6)


def test_cuda_tensors_take_the_kernels_only_when_opted_in(monkeypatch):
    """Until a GPU run is recorded the kernels are opt-in: the default leaves CUDA tensors
    to the path checked on a GPU, NLLLOSS_TRITON=1 opts in, 0 out."""
    x, t = _cuda_looking(), torch.zeros(2, dtype=torch.int64)
    monkeypatch.delenv("NLLLOSS_TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("NLLLOSS_TRITON", raising=False)
    # flipped (with this line) in the change that commits a passing GPU check
    assert triton_kernels._DEFAULT is False
    assert not triton_kernels.enabled()
    assert triton_kernels.launcher_for(_fake_problem(x, t)) is None
    monkeypatch.setenv("NLLLOSS_TRITON", "")
    assert triton_kernels.launcher_for(_fake_problem(x, t)) is None
    monkeypatch.setenv("NLLLOSS_TRITON", "0")
    assert triton_kernels.launcher_for(_fake_problem(x, t)) is None
    monkeypatch.setenv("NLLLOSS_TRITON", "1")
    assert triton_kernels.enabled()
    assert triton_kernels.launcher_for(_fake_problem(x, t)) is launch
    # asked for by name, the kernels refuse what they do not compute rather than hand it on
    with pytest.raises(ValueError, match=r"NLLLOSS_TRITON=1 asks for the Triton kernels, which do not compute input dtype torch.float64"):  # noqa: E501
        triton_kernels.launcher_for(_fake_problem(_cuda_looking(torch.float64), t))
    # the interpreter switch is the tests' way in: it enables the kernels too
    monkeypatch.setenv("NLLLOSS_TRITON", "0")
    monkeypatch.setenv("NLLLOSS_TRITON_INTERPRET", "1")
    assert triton_kernels.launcher_for(_fake_problem(x, t)) is launch
    # when the default flips, unset means yes and 0 still opts out
    monkeypatch.setattr(triton_kernels, "_DEFAULT", True)
    monkeypatch.delenv("NLLLOSS_TRITON_INTERPRET")
    monkeypatch.delenv("NLLLOSS_TRITON")
    assert triton_kernels.launcher_for(_fake_problem(x, t)) is launch
    monkeypatch.setenv("NLLLOSS_TRITON", "0")
    assert triton_kernels.launcher_for(_fake_problem(x, t)) is None


def test_a_misspelt_switch_is_refused(monkeypatch):
    monkeypatch.delenv("NLLLOSS_TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("NLLLOSS_TRITON", "yes")
    target = torch.zeros(2, dtype=torch.int64)
    with pytest.raises(ValueError, match="NLLLOSS_TRITON must be '0', '1' or unset, got 'yes'"):
        triton_kernels.launcher_for(_fake_problem(_cuda_looking(), target))


@pytest.mark.skipif(not CUDA, reason="the default route of real CUDA tensors")
def test_cuda_tensors_do_not_reach_the_kernels_by_default(monkeypatch):
    from nllloss._kernels.triton import _launch

    monkeypatch.delenv("NLLLOSS_TRITON", raising=False)
    monkeypatch.delenv("NLLLOSS_TRITON_INTERPRET", raising=False)

    def refuse(*args, **kwargs):
        raise AssertionError("the Triton kernels ran without the opt-in")

    for name in ("forward", "backward", "forward_backward"):
        monkeypatch.setattr(_launch, name, refuse)
    x = torch.randn(8, 5, device=DEVICE, requires_grad=True)
    t = torch.randint(0, 5, (8,), device=DEVICE)
    loss = nllloss.nll_loss(x, t, from_logits=True)
    loss.backward()
    torch.testing.assert_close(loss.detach(), F.cross_entropy(x.detach(), t))


def test_refuses_what_it_does_not_serve():
    t = torch.zeros(2, dtype=torch.int64, device=DEVICE)
    def supports(x, t):
        return launch.supports(_problem(x, t, None, -100, "mean"))

    assert not supports(torch.zeros(2, 3, dtype=torch.float64, device=DEVICE), t)
    assert not supports(torch.zeros(0, 3, device=DEVICE), t[:0])
    assert supports(torch.zeros(2, 3, dtype=torch.bfloat16, device=DEVICE), t)
    # an option the kernels do not declare is not theirs
    problem = _problem(torch.zeros(2, 3, device=DEVICE), t, None, -100, "mean")
    assert not launch.supports(problem.replace(options=_Canary(canary=1.0)))


def test_a_saved_state_from_other_arguments_is_refused():
    x = torch.randn(4, 3, device=DEVICE)
    t = torch.tensor([0, 2, 1, -100], device=DEVICE)
    one = torch.ones((), device=DEVICE)
    _, of_log_probabilities = _forward(x, t, None, -100, "mean")
    with pytest.raises(ValueError, match=r"saved.lse has 0 elements, but from logits the input"):
        _backward(one, x, t, None, -100, "mean", from_logits=True,
                        saved=of_log_probabilities)  # fmt: skip
    _, unchecked_none = _forward(x, t, None, -100, "none", check_targets=False)
    with pytest.raises(ValueError, match=r"saved\.denominator is empty, but 'mean' needs it"):
        _backward(one, x, t, None, -100, "mean", saved=unchecked_none)
    with pytest.raises(TypeError, match="saved must be the Saved that forward returned"):
        _backward(one, x, t, None, -100, "mean", saved=(x, one))


class _CountingKernels:
    """Stands in for ``_launch._kernels``: logs each launch (kernel, LOAD_X, FUSED_GRAD)."""

    def __init__(self, kernels, log):
        self._kernels, self._log = kernels, log

    def __getattr__(self, name):
        kernel, log = getattr(self._kernels, name), self._log

        class Grid:
            def __getitem__(self, grid):
                def run(*args, **kwargs):
                    log.append((name, kwargs.get("LOAD_X"), kwargs.get("FUSED_GRAD")))
                    return kernel[grid](*args, **kwargs)

                return run

        return Grid()


@pytest.mark.parametrize("check_targets", [True, False])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_a_training_step_reads_the_logits_once_and_syncs_at_most_once(
    reduction, check_targets, monkeypatch
):
    """forward + backward(saved): one pass over x each, nothing recomputed; the fused
    entry: one pass in all. One host sync with the target check, none without."""
    from nllloss._kernels.triton import _kernels, _launch

    log, syncs = [], []
    monkeypatch.setattr(_launch, "_kernels", _CountingKernels(_kernels, log))
    original = _launch._raise_first_bad
    monkeypatch.setattr(_launch, "_raise_first_bad", lambda *a: syncs.append(1) or original(*a))
    generator = torch.Generator().manual_seed(21)
    x = torch.randn(10, 7, generator=generator).to(DEVICE)
    t = torch.randint(0, 7, (10,), generator=generator).to(DEVICE)
    w = (torch.rand(7, generator=generator) + 0.5).to(DEVICE)
    options = {"from_logits": True, "label_smoothing": 0.1, "check_targets": check_targets}
    loss, saved = _forward(x, t, w, -100, reduction, **options)
    g = torch.ones(loss.shape, device=DEVICE)
    grad = _backward(g, x, t, w, -100, reduction, **options, saved=saved)
    reads_of_x = [entry for entry in log if entry[0] != "finish_kernel" and entry[1] is not False]
    assert reads_of_x == [("forward_kernel", True, False), ("backward_kernel", None, None)]
    assert len(syncs) == check_targets
    log.clear()
    syncs.clear()
    fused_loss, fused_grad = _forward_backward(x, t, w, -100, reduction, **options)
    reads_of_x = [entry for entry in log if entry[0] != "finish_kernel" and entry[1] is not False]
    assert reads_of_x == [("forward_kernel", True, True)]
    assert len(syncs) == check_targets
    assert torch.equal(fused_loss, loss)
    assert torch.equal(fused_grad, grad)
    # the oracle: float64 torch, forward and backward
    x64, expected = _reference(x, t, w, reduction, True, 0.1)
    _close(loss, expected, torch.float32)
    expected.backward(torch.ones_like(expected))
    _close(grad, x64.grad, torch.float32)


@pytest.mark.parametrize("check_targets", [True, False])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("from_logits", [False, True])
def test_an_autograd_training_step_reads_the_input_once_and_syncs_at_most_once(
    from_logits, reduction, check_targets, monkeypatch
):
    """The same through nllloss.nll_loss and autograd (bfloat16 CPU tensors stand in for
    CUDA ones without a GPU): the backward neither reads x again nor checks the targets
    again, whatever the upstream gradient."""
    from nllloss._kernels.triton import _kernels, _launch

    monkeypatch.setenv(*OPT_IN)
    log, syncs = [], []
    monkeypatch.setattr(_launch, "_kernels", _CountingKernels(_kernels, log))
    original = _launch._raise_first_bad
    monkeypatch.setattr(_launch, "_raise_first_bad", lambda *a: syncs.append(1) or original(*a))
    generator = torch.Generator().manual_seed(22)
    logits = torch.randn(10, 7, generator=generator, dtype=torch.float64)
    t = torch.randint(0, 7, (10,), generator=generator)
    t[3] = -100
    w = torch.rand(7, generator=generator, dtype=torch.float64) + 0.5
    g = torch.rand(() if reduction != "none" else (10,), generator=generator) + 0.5
    x = logits if from_logits else torch.log_softmax(logits, dim=1)
    x = x.to(torch.bfloat16)
    ours = x.to(DEVICE, copy=True).requires_grad_()
    options = {"from_logits": from_logits, "check_targets": check_targets}
    loss = nllloss.nll_loss(ours, t.to(DEVICE), w.to(DEVICE, torch.bfloat16),
                            reduction=reduction, **options)  # fmt: skip
    loss.backward(g.to(DEVICE, torch.bfloat16))
    # (a forward_kernel with LOAD_X=False is 'mean''s denominator pass over t and w only)
    launches = [entry for entry in log if entry[0] != "finish_kernel" and entry[1] is not False]
    if from_logits:  # one fused pass over x
        assert launches == [("forward_kernel", True, True)]
    else:  # x[t] gathered, then the gradient written (x not read)
        assert launches == [("forward_kernel", True, False), ("backward_kernel", None, None)]
    assert len(syncs) == check_targets
    x64 = x.double().requires_grad_()
    loss_function = F.cross_entropy if from_logits else F.nll_loss
    expected = loss_function(x64, t, w.to(torch.bfloat16).double(), reduction=reduction)
    expected.backward(g.to(torch.bfloat16).double())
    _close(loss, expected, torch.bfloat16)
    _close(ours.grad, x64.grad, torch.bfloat16)


@pytest.mark.skipif(not CUDA, reason="torch's sync debug mode watches CUDA synchronisations")
def test_unchecked_training_step_never_syncs_the_host():
    x, target, weight = _kdim_case(seed=12)
    options = {"from_logits": True, "label_smoothing": 0.1, "check_targets": False}
    one = torch.ones((), device=DEVICE)
    for reduction in ("mean", "none"):  # compiled before the watch starts
        loss, saved = _forward(x, target, weight, -100, reduction, **options)
        _backward(torch.ones_like(loss), x, target, weight, -100, reduction, **options,
                        saved=saved)  # fmt: skip
        _forward_backward(x, target, weight, -100, reduction, **options)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss, saved = _forward(x, target, weight, -100, "mean", **options)
        _backward(one, x, target, weight, -100, "mean", **options, saved=saved)
        _forward_backward(x, target, weight, -100, "mean", **options)
        loss, saved = _forward(x, target, weight, -100, "none", **options)
        _backward(torch.ones_like(loss), x, target, weight, -100, "none", **options,
                  saved=saved)  # fmt: skip
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_cpu_tensors_are_not_served_without_the_interpreter_switch(monkeypatch):
    monkeypatch.delenv("NLLLOSS_TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("NLLLOSS_TRITON", "1")  # CUDA tensors only
    x = torch.zeros(2, 3)
    assert triton_kernels.launcher_for(_fake_problem(x, torch.zeros(2, dtype=torch.int64))) is None


def test_importing_nllloss_imports_no_triton():
    import subprocess
    import sys

    code = (
        "import sys, nllloss, nllloss._kernels.triton; "
        "assert 'triton' not in sys.modules, 'triton'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("from_logits", [False, True])
def test_all_ignored(from_logits):
    """As torch: 'mean' over no counted target is 0/0 = NaN, 'sum' 0, the gradient 0."""
    x = torch.randn(4, 3).to(DEVICE)
    target = torch.full((4,), -100, device=DEVICE)
    for reduction in ("mean", "sum"):
        loss, _ = _forward(x, target, None, -100, reduction, from_logits=from_logits)
        expected = F.cross_entropy(x.cpu(), target.cpu(), reduction=reduction)
        assert torch.equal(loss.cpu().isnan(), expected.isnan())
        assert reduction == "mean" or float(loss) == 0.0
        one = torch.ones((), device=DEVICE)
        grad = _backward(one, x, target, None, -100, reduction, from_logits=from_logits)
        assert torch.equal(grad, torch.zeros_like(x))


_COMPILE = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from nllloss._kernels.triton import _kernels as K


def build(kernel, types, constants):
    signature = {**types, **{name: "constexpr" for name in constants}}
    names = list(kernel.arg_names)
    aligned = {(names.index(n),): [["tt.divisibility", 16]] for n, t in types.items() if "*" in t}
    source = ASTSource(kernel, signature=signature, constexprs=constants, attrs=aligned)
    ptx = triton.compile(source, target=GPUTarget("cuda", 90, 32)).asm["ptx"]
    assert ".entry" in ptx


positions = dict(C="i32", S="i32", blocks="i32", stride_b="i64", stride_c="i32", stride_s="i32",
                 t_stride_b="i64", t_stride_c="i32", t_stride_s="i32",
                 grad_stride_b="i64", grad_stride_c="i32", grad_stride_s="i32",
                 ignore_index="i64", eps="fp32", z="fp32", cap="fp32",
                 cap_first="fp32", cap_second="fp32")
for probs in (False, True):
    forward = dict(x_ptr="*bf16", t_ptr="*bf16" if probs else "*i32", w_ptr="*bf16",
                   loss_ptr="*bf16", lse_ptr="*fp32", mass_ptr="*fp32", part_loss_ptr="*fp32",
                   part_weight_ptr="*fp32", part_bad_ptr="*i64", grad_ptr="*bf16",
                   denominator_ptr="*fp32", M="i64", **positions)
    for full in (False, True):
        build(K.forward_kernel, forward, dict(
            FULL_ROW=full, FROM_LOGITS=full, HAS_WEIGHT=True, SMOOTH=full, PROBS=probs,
            Z_LOSS=full, SOFTCAP=full, WRITE_LOSS=True, WRITE_LSE=full, LOAD_X=True,
            FUSED_GRAD=full, MEAN=full, BLOCK_M=64, BLOCK_C=64))
    backward = dict(x_ptr="*fp16", t_ptr="*fp32" if probs else "*i64", w_ptr="*fp16",
                    g_ptr="*fp16", denominator_ptr="*fp32", lse_ptr="*fp32", mass_ptr="*fp32",
                    grad_ptr="*fp16", **positions)
    for logits in (False, True):
        build(K.backward_kernel, backward, dict(
            FROM_LOGITS=logits, HAS_WEIGHT=True, SMOOTH=True, PROBS=probs, Z_LOSS=logits,
            SOFTCAP=logits, PER_POSITION=logits, MEAN=not logits, BLOCK_M=64, BLOCK_C=64))
finish = dict(part_loss_ptr="*fp32", part_weight_ptr="*fp32", part_bad_ptr="*i64",
              n_parts="i32", out_ptr="*bf16", denominator_ptr="*fp32", bad_ptr="*i64",
              total_weight_ptr="*i64", total_weight="fp32", M="i64")
for mode in (0, 1, 2):
    build(K.finish_kernel, finish, dict(MEAN=True, REDUCE=True, TOTAL_WEIGHT=mode, BLOCK_P=256))
"""


def test_kernels_compile_for_hopper():
    """The interpreter runs kernels as Python: compiling them (to PTX and SASS for sm_90,
    which needs no GPU) catches what only the compiler rejects."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    subprocess.run([sys.executable, "-c", _COMPILE], check=True, env=env, capture_output=True)


@pytest.mark.parametrize("options", [{}, {"from_logits": True, "label_smoothing": 0.1}])
def test_torch_operators_route_to_the_kernels(options, monkeypatch):
    """nllloss.nll_loss and autograd on tensors the kernels serve run the kernels once
    opted in (without a GPU, bfloat16 CPU tensors under the interpreter stand in for CUDA
    tensors): from logits, one fused pass writes the loss and the gradient; on
    log-probabilities the forward reads x[t] and the backward writes the gradient."""
    from nllloss._kernels.triton import _launch

    monkeypatch.setenv(*OPT_IN)
    calls = []
    for name in ("forward", "backward", "forward_backward"):
        original = getattr(_launch, name)

        def spy(*args, _original=original, _name=name, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(_launch, name, spy)
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(12, 5, generator=generator).to(torch.bfloat16)
    t = torch.randint(0, 5, (12,), generator=generator)
    t[::4] = -100
    ours = x.to(DEVICE, copy=True).requires_grad_()
    loss = nllloss.nll_loss(ours, t.to(DEVICE), **options)
    loss.backward()
    assert calls == (["forward_backward"] if options else ["forward", "backward"])
    reference = x.double().requires_grad_()
    if options:
        expected = F.cross_entropy(reference, t, label_smoothing=0.1)
    else:
        expected = F.nll_loss(reference, t)
    expected.backward()
    torch.testing.assert_close(loss.double().cpu(), expected, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(ours.grad.double().cpu(), reference.grad, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("options", [{"z_loss": 0.5}, {"softcap": 1.5}])
def test_z_loss_and_softcap_are_not_dropped_by_the_torch_route(options, monkeypatch):
    """nllloss.nll_loss with z_loss or softcap on tensors the kernels serve gives the
    loss with them (a route that dropped them would give plain cross-entropy)."""
    monkeypatch.setenv(*OPT_IN)
    calls = _spy_on_launches(monkeypatch)
    generator = torch.Generator().manual_seed(30)
    x = (torch.randn(6, 5, generator=generator) * 3).to(torch.bfloat16)
    t = torch.randint(0, 5, (6,), generator=generator)
    loss = nllloss.nll_loss(x.to(DEVICE), t.to(DEVICE), from_logits=True, **options)
    x64 = x.double()
    if "softcap" in options:
        cap = options["softcap"]
        expected = F.cross_entropy(cap * torch.tanh(x64 / cap), t)
    else:
        expected = (
            F.cross_entropy(x64, t) + options["z_loss"] * (torch.logsumexp(x64, 1) ** 2).mean()
        )
    _close(loss, expected, torch.bfloat16)
    assert calls == ["forward"]


# --- z_loss, softcap and probability targets --------------------------------------------

# (probabilities, from_logits, weighted, label_smoothing, total_weight, z_loss, softcap)
OPTION_CASES = {
    "z_loss": (False, True, True, 0.0, None, 0.3, None),
    "softcap": (False, True, False, 0.1, None, 0.0, 2.0),
    "z_loss+softcap": (False, True, True, 0.2, 7.5, 0.2, 2.5),
    "probabilities-logits": (True, True, True, 0.1, None, 0.0, None),
    "probabilities-log": (True, False, False, 0.0, None, 0.0, None),
    "probabilities-log-weighted": (True, False, True, 0.2, 3.5, 0.0, None),
    "probabilities-all": (True, True, True, 0.1, 5.0, 0.25, 1.5),
}
OPTION_SHAPES = {
    "unbatched": ((7,), None),
    "2d": ((13, 6), None),
    "2d-transposed": ((13, 6), (1, 0)),  # the class axis strided
    "kdim-transposed": ((2, 5, 3, 4), (0, 3, 2, 1)),  # no axis of stride 1 where it was
}


def _option_input(shape_name, case, dtype, generator):
    """(x, target, weight, options) on DEVICE: x rounded to dtype (logits, or
    log-probabilities), target class indices (some ignored) or probabilities."""
    probabilities, from_logits, weighted, smoothing, total, z_loss, softcap = case
    shape, order = OPTION_SHAPES[shape_name]
    axis = 0 if len(shape) == 1 else 1
    classes = shape[axis]

    def laid_out(tensor):  # the values of `tensor`, with the strides of a transposed copy
        if order is None:
            return tensor
        return tensor.permute(order).contiguous().permute(*torch.argsort(torch.tensor(order)))

    logits = torch.randn(shape, generator=generator, dtype=torch.float64) * 3
    x = logits if from_logits else torch.log_softmax(logits, dim=axis)
    x = laid_out(x.to(dtype))
    assert order is None or not x.is_contiguous()
    if probabilities:
        scores = torch.randn(shape, generator=generator, dtype=torch.float64) * 2
        target = laid_out(torch.softmax(scores, dim=axis).to(dtype))
    else:
        target = torch.randint(
            0, classes, shape[:1] + shape[2:] if axis else (), generator=generator
        )
        if target.dim():
            target.view(-1)[::4] = -100
    weight = (torch.rand(classes, generator=generator, dtype=torch.float64) + 0.25).to(dtype)
    options = {
        "from_logits": from_logits,
        "label_smoothing": smoothing,
        "total_weight": total,
        "z_loss": z_loss,
        "softcap": softcap,
    }
    return x.to(DEVICE), target.to(DEVICE), weight.to(DEVICE) if weighted else None, options


def _option_oracle(x, target, weight, reduction, options):
    """float64 loss (with autograd) from torch operations: the capped logits
    ``c * tanh(x / c)``, ``F.cross_entropy`` (class indices or probabilities), the z-loss
    ``z * logsumexp**2`` per element (weighted by w[t] for class indices), and on
    log-probabilities ``-sum_c w_c p'_c x_c`` written out."""
    x64 = x.detach().cpu().double().requires_grad_()
    axis = 0 if x64.dim() == 1 else 1
    classes = x64.shape[axis]
    w = None if weight is None else weight.cpu().double()
    eps = options["label_smoothing"]
    probabilities = target.dtype.is_floating_point
    t = target.cpu().double() if probabilities else target.cpu().long()
    logits = x64
    if options["softcap"] is not None:
        cap = options["softcap"]
        logits = cap * torch.tanh(x64 / cap)
    if options["from_logits"]:
        losses = F.cross_entropy(logits, t, weight=w, reduction="none", label_smoothing=eps)
    else:  # log-probabilities: probability targets only
        shape = [1] * x64.dim()
        shape[axis] = classes
        smoothed = (1 - eps) * t + eps / classes
        w_all = torch.ones(classes, dtype=torch.float64) if w is None else w
        losses = -(x64 * smoothed * w_all.view(shape)).sum(axis)
    if probabilities:
        element_weight = torch.ones_like(losses)
        count = losses.numel()
    else:
        valid = t != -100
        w_t = torch.ones(classes, dtype=torch.float64) if w is None else w
        element_weight = torch.where(valid, w_t[t.clamp(min=0)], 0.0)
        count = element_weight.sum()
    if options["z_loss"]:
        lse = torch.logsumexp(logits, dim=axis)
        losses = losses + options["z_loss"] * lse**2 * element_weight
    if reduction == "none" and x64.dim() > 1:
        return x64, losses
    total = losses.sum()
    if reduction == "mean":
        given = options["total_weight"]
        total = total / (count if given is None else given)
    return x64, total


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", list(OPTION_SHAPES))
@pytest.mark.parametrize("case", list(OPTION_CASES))
def test_options_match_torch(case, shape, dtype, reduction, request):
    """z_loss, softcap and probability targets: forward, backward with and without the
    forward's saved state, and the fused unit gradient, against float64 torch."""
    generator = torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))
    x, target, weight, options = _option_input(shape, OPTION_CASES[case], dtype, generator)
    loss, saved = _forward(x, target, weight, -100, reduction, **options)
    x64, expected = _option_oracle(x, target, weight, reduction, options)
    assert loss.dtype == dtype
    assert loss.shape == expected.shape
    _close(loss, expected, dtype)

    upstream = torch.rand(expected.shape, generator=generator, dtype=torch.float64) + 0.5
    expected.backward(upstream, retain_graph=True)
    g = upstream.to(dtype).to(DEVICE)
    grad = _backward(g, x, target, weight, -100, reduction, **options, saved=saved)
    assert grad.dtype == dtype
    assert grad.shape == x.shape
    _close(grad, x64.grad, dtype)
    again = _backward(g, x, target, weight, -100, reduction, **options)
    assert torch.equal(grad, again)
    loss_fused, fused = _forward_backward(x, target, weight, -100, reduction, **options)
    assert torch.equal(loss_fused, loss)
    ones = torch.ones(expected.shape, dtype=dtype, device=DEVICE)
    assert torch.equal(fused, _backward(ones, x, target, weight, -100, reduction, **options))
    x64.grad = None
    expected.backward(torch.ones_like(expected))
    _close(fused, x64.grad, dtype)


def _spy_on_launches(monkeypatch):
    """The names of the launcher's entry points as the torch route calls them."""
    from nllloss._kernels.triton import _launch

    calls = []
    for name in ("forward", "backward", "forward_backward"):
        original = getattr(_launch, name)

        def spy(*args, _original=original, _name=name, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(_launch, name, spy)
    return calls


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", ["2d", "kdim-transposed"])
@pytest.mark.parametrize(
    "case", ["z_loss+softcap", "probabilities-logits", "probabilities-log-weighted"]
)
def test_options_through_autograd_run_the_kernels(case, shape, dtype, reduction, monkeypatch):
    """nllloss.nll_loss and autograd with z_loss, softcap or probability targets: one fused
    pass of the kernels computes the loss and the gradient (without a GPU, CPU tensors under
    the interpreter stand in for CUDA ones; float16/float32 CPU tensors, which the NumPy
    engine takes by default, are sent to the kernels too)."""
    from nllloss._torch import engines

    monkeypatch.setenv(*OPT_IN)
    monkeypatch.setattr(engines, "EXACT_ON_NUMPY", ())
    calls = _spy_on_launches(monkeypatch)
    generator = torch.Generator().manual_seed(zlib.crc32(f"{case}{shape}{dtype}".encode()))
    x, target, weight, options = _option_input(shape, OPTION_CASES[case], dtype, generator)
    if reduction != "mean":
        options["total_weight"] = None  # a 'mean' denominator only
    ours = x.detach().clone().requires_grad_()
    loss = nllloss.nll_loss(ours, target, weight, reduction=reduction, **options)
    x64, expected = _option_oracle(x, target, weight, reduction, options)
    g = torch.rand(expected.shape, generator=generator, dtype=torch.float64) + 0.5
    loss.backward(g.to(dtype).to(DEVICE))
    assert calls == ["forward_backward"]
    expected.backward(g.to(dtype).double())
    _close(loss, expected, dtype)
    _close(ours.grad, x64.grad, dtype)


@pytest.mark.parametrize(
    "case", ["z_loss+softcap", "probabilities-all", "probabilities-log-weighted"]
)
def test_options_over_many_class_and_position_blocks(case, monkeypatch):
    """Tiles smaller than the rows: the running maximum that probability targets are
    re-centred on moves across class blocks, and the cap and z-loss apply per block."""
    from nllloss._kernels.triton import _launch

    for name in ("_TILE", "_TILE_INTERPRETED", "_GATHER_ROWS"):
        monkeypatch.setattr(_launch, name, 64)
    monkeypatch.setattr(_launch, "_STRIDED_CLASS_BLOCK", 8)
    monkeypatch.setattr(_launch, "_FINISH_BLOCK", 4)
    probabilities, from_logits, weighted, smoothing, total, z_loss, softcap = OPTION_CASES[case]
    generator = torch.Generator().manual_seed(31)
    options = {
        "from_logits": from_logits,
        "label_smoothing": smoothing,
        "total_weight": total,
        "z_loss": z_loss,
        "softcap": softcap,
    }
    for shape in [(9, 200), (2, 21, 13)]:
        # logits that rise along the classes: the maximum moves in every block
        rising = torch.linspace(0, 6, shape[1]).view(1, -1, *[1] * (len(shape) - 2))
        x = torch.randn(shape, generator=generator) * 2 + rising
        if not from_logits:
            x = torch.log_softmax(x, dim=1)
        if probabilities:
            target = torch.softmax(torch.randn(shape, generator=generator), dim=1)
        else:
            target = torch.randint(0, shape[1], (shape[0], *shape[2:]), generator=generator)
            target.view(-1)[::5] = -100
        weight = torch.rand(shape[1], generator=generator) + 0.5 if weighted else None
        x, target = x.to(DEVICE), target.to(DEVICE)
        weight = None if weight is None else weight.to(DEVICE)
        for reduction in ("none", "mean", "sum"):
            loss, saved = _forward(x, target, weight, -100, reduction, **options)
            x64, expected = _option_oracle(x, target, weight, reduction, options)
            _close(loss, expected, torch.float32)
            expected.backward(torch.ones_like(expected))
            ones = torch.ones(expected.shape, device=DEVICE)
            grad = _backward(ones, x, target, weight, -100, reduction, **options, saved=saved)
            _close(grad, x64.grad, torch.float32)
            _, fused = _forward_backward(x, target, weight, -100, reduction, **options)
            assert torch.equal(fused, grad)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_probability_targets_read_the_logits_once_and_never_sync(reduction, monkeypatch):
    """Probability targets have nothing to check: a training step (forward + backward with
    saved, or the fused entry) reads x once per pass and never reads a value back."""
    from nllloss._kernels.triton import _kernels, _launch

    log, syncs = [], []
    monkeypatch.setattr(_launch, "_kernels", _CountingKernels(_kernels, log))
    monkeypatch.setattr(_launch, "_raise_first_bad", lambda *a: syncs.append(1))
    generator = torch.Generator().manual_seed(23)
    x = torch.randn(10, 7, generator=generator).to(DEVICE)
    p = torch.softmax(torch.randn(10, 7, generator=generator), dim=1).to(DEVICE)
    options = {"from_logits": True, "label_smoothing": 0.1, "z_loss": 0.1, "softcap": 3.0}
    loss, saved = _forward(x, p, None, -100, reduction, **options)
    g = torch.ones(loss.shape, device=DEVICE)
    grad = _backward(g, x, p, None, -100, reduction, **options, saved=saved)
    reads_of_x = [entry for entry in log if entry[0] != "finish_kernel" and entry[1] is not False]
    assert reads_of_x == [("forward_kernel", True, False), ("backward_kernel", None, None)]
    log.clear()
    fused_loss, fused_grad = _forward_backward(x, p, None, -100, reduction, **options)
    reads_of_x = [entry for entry in log if entry[0] != "finish_kernel" and entry[1] is not False]
    assert reads_of_x == [("forward_kernel", True, True)]
    assert syncs == []
    assert torch.equal(fused_loss, loss)
    assert torch.equal(fused_grad, grad)


def test_probability_targets_are_served_only_of_the_input_shape():
    x = torch.zeros(4, 3, device=DEVICE)
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        assert launch.supports(_fake_problem(x, torch.zeros(4, 3, dtype=dtype, device=DEVICE)))
    assert not launch.supports(_fake_problem(x[:0], torch.zeros(0, 3, device=DEVICE)))  # empty


def test_empty_probability_targets_take_the_generic_path(monkeypatch):
    """An empty input is not the kernels': 'mean' over no element is NaN, as torch's."""
    monkeypatch.setenv(*OPT_IN)
    calls = _spy_on_launches(monkeypatch)
    x = torch.zeros(0, 4, dtype=torch.bfloat16, device=DEVICE, requires_grad=True)
    p = torch.zeros(0, 4, dtype=torch.bfloat16, device=DEVICE)
    loss = nllloss.nll_loss(x, p, from_logits=True, z_loss=0.1, softcap=2.0)
    expected = F.cross_entropy(x.detach().double().cpu(), p.double().cpu())
    assert torch.isnan(loss)
    assert torch.isnan(expected)
    loss.backward()
    assert x.grad.shape == x.shape
    assert calls == []


def test_a_saved_state_of_class_indices_is_refused_for_probabilities():
    x = torch.randn(4, 3, device=DEVICE)
    t = torch.tensor([0, 2, 1, -100], device=DEVICE)
    p = torch.softmax(torch.randn(4, 3), dim=1).to(DEVICE)
    _, of_indices = _forward(x, t, None, -100, "sum", from_logits=True)
    with pytest.raises(ValueError, match=r"saved\.mass has 0 elements, but probability"):
        _backward(torch.ones((), device=DEVICE), x, p, None, -100, "sum",
                        from_logits=True, saved=of_indices)  # fmt: skip

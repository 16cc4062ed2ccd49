"""Targets of class probabilities: a floating target of the input's shape.

Oracles: torch 2.13's ``F.cross_entropy`` with probability targets, in float64, and its
autograd; for log-probability input (``from_logits=False``, ours), the formula
``-sum_c w_c p_c x_c`` written with torch operations and differentiated by autograd.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import BFLOAT16, EXACT_DTYPES, FLOAT_DTYPES, to_torch
from hypothesis import given
from hypothesis import strategies as st
from test_backends import BACKENDS, to_backend, to_numpy
from test_options import assert_close

import nllloss
import nllloss.torch
from nllloss import nll_loss, nll_loss_and_grad, nll_loss_backward

SHAPES = [(5,), (9, 6), (4, 5, 3), (3, 4, 2, 3), (0, 4), (6, 1), (3, 0)]


def probabilities(rng, shape, dtype=np.float64, kind="distribution"):
    """Targets along axis 1 (axis 0 unbatched): distributions, or any real values."""
    axis = 0 if len(shape) == 1 else 1
    if kind == "distribution":
        p = rng.random(shape) ** 3  # some near 0
        with np.errstate(invalid="ignore"):
            p = p / p.sum(axis=axis, keepdims=True)
        p = np.nan_to_num(p)
    else:  # negative values, sums other than 1: used as given, as torch's
        p = rng.uniform(-0.5, 1.5, shape)
        p.reshape(-1)[:1] = -0.25
    return p.astype(dtype)


def case(rng, shape, dtype=np.float64, weighted=True, kind="distribution"):
    x = (rng.standard_normal(shape) * 3).astype(dtype)
    classes = shape[0] if len(shape) == 1 else shape[1]
    w = rng.uniform(0.2, 2.0, classes).astype(dtype) if weighted else None
    return x, probabilities(rng, shape, dtype, kind), w


def torch_loss(x, p, w, reduction, smoothing=0.0, from_logits=True):
    """torch's loss in float64 (a tensor that requires grad for the input), from arrays."""
    xt = torch.from_numpy(np.asarray(x, dtype=np.float64)).requires_grad_()
    pt = torch.from_numpy(np.asarray(p, dtype=np.float64))
    wt = None if w is None else torch.from_numpy(np.asarray(w, dtype=np.float64))
    if from_logits:
        loss = F.cross_entropy(xt, pt, weight=wt, reduction=reduction, label_smoothing=smoothing)
        return xt, loss
    # ours: cross_entropy's formula on log-probabilities, without its log_softmax
    class_dim = 0 if xt.dim() == 1 else 1
    classes = xt.shape[class_dim]
    target = pt * (1 - smoothing) + smoothing / classes if smoothing and classes else pt
    if wt is not None:
        shape = [1] * xt.dim()
        shape[class_dim] = classes
        target = target * wt.view(shape)
    per_element = -(xt * target).sum(class_dim)
    if reduction == "none":
        return xt, per_element
    if reduction == "sum":
        return xt, per_element.sum()
    count = xt.numel() // classes if xt.numel() else float("nan")
    return xt, per_element.sum() / count


def upstream_for(loss: torch.Tensor, dtype, rng):
    return rng.uniform(0.5, 1.5, tuple(loss.shape)).astype(dtype)


def check_against_torch(x, p, w, reduction, smoothing, from_logits, dtype, rng, **options):
    xt, expected = torch_loss(x, p, w, reduction, smoothing, from_logits)
    kwargs = dict(weight=w, reduction=reduction, from_logits=from_logits, **options)
    loss = nll_loss(x, p, label_smoothing=smoothing, **kwargs)
    assert loss.dtype == x.dtype
    assert_close(loss, expected.detach().numpy(), dtype, scale=10)
    g = upstream_for(expected, dtype, rng)
    if expected.numel() and expected.requires_grad:
        expected.backward(torch.from_numpy(g.astype(np.float64)))
        expected_grad = xt.grad.numpy()
    else:
        expected_grad = np.zeros(x.shape)
    grad = nll_loss_backward(g, x, p, label_smoothing=smoothing, **kwargs)
    assert grad.dtype == x.dtype
    assert grad.shape == x.shape
    assert_close(grad, expected_grad, dtype)
    both = nll_loss_and_grad(x, p, label_smoothing=smoothing, grad_output=g, **kwargs)
    assert_close(both[0], expected.detach().numpy(), dtype, scale=10)
    assert_close(both[1], expected_grad, dtype)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("from_logits", [True, False])
@pytest.mark.parametrize("weighted", [True, False])
def test_loss_and_gradient_match_torch(shape, reduction, smoothing, from_logits, weighted, rng):
    for dtype in EXACT_DTYPES:
        x, p, w = case(rng, shape, dtype, weighted)
        check_against_torch(x, p, w, reduction, smoothing, from_logits, dtype, rng)


@st.composite
def probability_cases(draw):
    """A shape of rank 1 to 4 (zero-size axes too), a dtype, the options, a target kind."""
    shape = tuple(draw(st.lists(st.integers(0, 6), min_size=1, max_size=4)))
    return {
        "shape": shape,
        "dtype": draw(st.sampled_from(FLOAT_DTYPES)),
        "weighted": draw(st.booleans()),
        "smoothing": draw(st.sampled_from([0.0, 0.05, 0.5, 1.0])),
        "reduction": draw(st.sampled_from(["none", "mean", "sum"])),
        "from_logits": draw(st.booleans()),
        "kind": draw(st.sampled_from(["distribution", "any"])),
        "seed": draw(st.integers(0, 2**16)),
    }


@given(probability_cases())
def test_hypothesis_against_torch_cross_entropy(example):
    """Loss and gradient of all three entry points against float64 torch (``cross_entropy``
    with probability targets from logits) on the example's values in its dtype."""
    rng = np.random.default_rng(example["seed"])
    dtype = example["dtype"]
    x, p, w = case(rng, example["shape"], np.float64, example["weighted"], example["kind"])
    x, p = x.astype(dtype), p.astype(dtype)
    w = None if w is None else w.astype(dtype)
    args = (example["reduction"], example["smoothing"], example["from_logits"])
    xt, expected = torch_loss(x, p, w, *args)
    options = dict(weight=w, reduction=args[0], label_smoothing=args[1], from_logits=args[2])
    # the loss adds up to 6**3 elements' terms of up to ~20 each
    scale = 10.0 * max(1, p.size if args[0] == "sum" else 1)
    loss = nll_loss(x, p, **options)
    assert loss.dtype == x.dtype
    assert_close(loss, expected.detach().numpy(), dtype, scale=scale)
    g = upstream_for(expected, np.float64, rng)
    if expected.numel() and expected.requires_grad:
        (expected_grad,) = torch.autograd.grad(expected, xt, torch.from_numpy(g))
        expected_grad = expected_grad.numpy()
    else:
        expected_grad = np.zeros(x.shape)
    g = g.astype(dtype)
    for result in (
        nll_loss_backward(g, x, p, **options),
        nll_loss_and_grad(x, p, grad_output=g, **options)[1],
    ):
        assert result.dtype == x.dtype
        assert result.shape == x.shape
        assert_close(result, expected_grad, dtype, scale=10.0)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("shape", [(7, 4), (3, 5, 2), (6,)])
def test_targets_that_are_not_distributions_are_used_as_given(reduction, shape, rng):
    x, p, w = case(rng, shape, kind="any")
    assert (p < 0).any()
    check_against_torch(x, p, w, reduction, 0.1, True, np.dtype(np.float64), rng)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_every_dtype_against_float64_torch(dtype, rng):
    """16-bit inputs (and targets, in the input's dtype) compute in float32."""
    x, p, w = case(rng, (33, 7, 3), np.float32)
    x, p, w = x.astype(dtype), p.astype(dtype), w.astype(dtype)
    for reduction in ("none", "mean", "sum"):
        check_against_torch(x, p, w, reduction, 0.1, True, dtype, rng)


def test_target_of_another_float_dtype_is_used_in_the_inputs(rng):
    x, p, w = case(rng, (8, 5), np.float32)
    loss = nll_loss(x, p.astype(np.float64), weight=w, from_logits=True)
    assert loss.dtype == np.float32
    assert loss == nll_loss(x, p, weight=w, from_logits=True)


def test_log_probabilities_give_cross_entropy_of_the_logits(rng):
    """``nll_loss(log_softmax(z), p) == cross_entropy(z, p)``: the reason for the form."""
    z, p, w = case(rng, (20, 6))
    log_probs = torch.log_softmax(torch.from_numpy(z), dim=1).numpy()
    expected = F.cross_entropy(
        torch.from_numpy(z), torch.from_numpy(p), weight=torch.from_numpy(w), label_smoothing=0.2
    )
    loss = nll_loss(log_probs, p, weight=w, label_smoothing=0.2)
    np.testing.assert_allclose(loss, expected.numpy(), rtol=1e-12)


@pytest.mark.parametrize("from_logits", [True, False])
def test_total_weight_replaces_the_mean_denominator(from_logits, rng):
    x, p, w = case(rng, (12, 5, 2))
    _, summed = torch_loss(x, p, w, "sum", 0.1, from_logits)
    options = dict(weight=w, from_logits=from_logits, label_smoothing=0.1)
    loss = nll_loss(x, p, total_weight=7.5, **options)
    np.testing.assert_allclose(loss, summed.detach().numpy() / 7.5, rtol=1e-12)
    # micro-batches with the whole batch's count add up to its mean
    pieces = [
        nll_loss(x[i : i + 4], p[i : i + 4], total_weight=12 * 2, **options) for i in (0, 4, 8)
    ]
    np.testing.assert_allclose(sum(pieces), nll_loss(x, p, **options), rtol=1e-12)


@pytest.mark.parametrize("from_logits", [True, False])
def test_ignore_index_does_not_apply_and_may_not_name_a_class(from_logits, rng):
    """As torch's cross_entropy: a negative ignore_index changes nothing (no value of the
    target is compared with it); one that could name a class is refused."""
    x, p, w = case(rng, (6, 5))
    options = dict(weight=w, from_logits=from_logits)
    for ignore_index in (-1, -(2**63)):
        np.testing.assert_array_equal(
            nll_loss(x, p, ignore_index=ignore_index, **options), nll_loss(x, p, **options)
        )
    for ignore_index in (0, 2, 5, 2**40):
        with pytest.raises(ValueError, match=f"probabilities .* got ignore_index={ignore_index}"):
            nll_loss(x, p, ignore_index=ignore_index, **options)
        with pytest.raises(RuntimeError, match="ignore_index is not supported"):
            F.cross_entropy(torch.from_numpy(x), torch.from_numpy(p), ignore_index=ignore_index)


def test_gradient_into_out_and_over_the_input(rng):
    x, p, w = case(rng, (10, 7))
    xt, expected = torch_loss(x, p, w, "mean", 0.1)
    expected.backward()
    out = np.empty_like(x)
    options = dict(weight=w, from_logits=True, label_smoothing=0.1)
    assert nll_loss_backward(1.0, x, p, out=out, **options) is out
    np.testing.assert_allclose(out, xt.grad.numpy(), rtol=1e-12, atol=1e-15)
    loss, grad = nll_loss_and_grad(x, p, out=x, **options)
    assert grad is x
    np.testing.assert_allclose(x, xt.grad.numpy(), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(loss, expected.detach().numpy(), rtol=1e-12)


@pytest.fixture(params=sorted(BACKENDS))
def backend(request) -> str:
    return request.param


@pytest.mark.parametrize("dtype", EXACT_DTYPES)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("shape", [(6,), (7, 5), (4, 5, 3)])
def test_every_backend_matches_torch(backend, dtype, reduction, shape, rng):
    x, p, w = case(rng, shape, dtype)
    xt, expected = torch_loss(x, p, w, reduction, 0.1)
    g = upstream_for(expected, dtype, rng)
    expected.backward(torch.from_numpy(g.astype(np.float64)))
    arrays = [to_backend(backend, a) for a in (x, p, w, g)]
    options = dict(weight=arrays[2], reduction=reduction, from_logits=True, label_smoothing=0.1)
    loss = nllloss.nll_loss(arrays[0], arrays[1], **options)
    grad = nllloss.nll_loss_backward(arrays[3], arrays[0], arrays[1], **options)
    assert type(loss) is type(arrays[0])
    assert type(grad) is type(arrays[0])
    assert_close(to_numpy(loss), expected.detach().numpy(), dtype, scale=10)
    assert_close(to_numpy(grad), xt.grad.numpy(), dtype)


def test_jax_jit_and_grad(rng):
    jax = pytest.importorskip("jax")
    x, p, w = case(rng, (5, 4))
    xt, expected = torch_loss(x, p, w, "mean", 0.1)
    expected.backward()

    def loss(x):
        return nllloss.nll_loss(x, p, weight=w, from_logits=True, label_smoothing=0.1)

    np.testing.assert_allclose(jax.jit(loss)(x), expected.detach().numpy(), rtol=1e-12)
    np.testing.assert_allclose(jax.grad(loss)(x), xt.grad.numpy(), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("options", [{}, {"label_smoothing": 0.2}, {"reduction": "none"}])
def test_torch_autograd_compile_and_transforms(options, rng):
    x, p, w = (torch.from_numpy(a) for a in case(rng, (6, 5)))
    kwargs = dict(weight=w, **options)

    def ours(x):
        return nllloss.nll_loss(x, p, from_logits=True, **kwargs)

    def theirs(x):
        return F.cross_entropy(x, p, **kwargs).sum()

    x = x.requires_grad_()
    assert torch.autograd.gradcheck(lambda x: ours(x).sum(), (x,))
    assert torch.autograd.gradgradcheck(lambda x: ours(x).sum(), (x,))
    (expected,) = torch.autograd.grad(theirs(x), x)
    torch.testing.assert_close(torch.func.grad(lambda x: ours(x).sum())(x.detach()), expected)
    batched = torch.func.vmap(lambda x, p: nllloss.nll_loss(x, p, from_logits=True, **kwargs))(
        torch.stack([x.detach()] * 2), torch.stack([p] * 2)
    )
    torch.testing.assert_close(batched[1], F.cross_entropy(x.detach(), p, **kwargs))
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    loss = compiled(x)
    torch.testing.assert_close(loss, F.cross_entropy(x, p, **kwargs))
    (grad,) = torch.autograd.grad(loss.sum(), x)
    torch.testing.assert_close(grad, expected)


@pytest.mark.parametrize("from_logits", [True, False])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_torch_gradient_with_respect_to_the_target(from_logits, reduction, rng):
    """As torch's cross_entropy, the loss is differentiable with respect to probabilities
    (a teacher's distribution trained with its student, say)."""
    x, p, w = case(rng, (6, 5, 2))
    pt = torch.from_numpy(p).requires_grad_()
    xt = torch.from_numpy(x).requires_grad_()
    options = dict(weight=torch.from_numpy(w), reduction=reduction, label_smoothing=0.1)
    loss = nll_loss(xt, pt, from_logits=from_logits, **options)
    upstream = torch.from_numpy(rng.uniform(0.5, 1.5, tuple(loss.shape)))
    ours = torch.autograd.grad(loss, (xt, pt), upstream)
    if from_logits:
        expected = F.cross_entropy(xt, pt, **options)
    else:  # -sum_c w_c p'_c x_c, written out
        smoothed = pt * 0.9 + 0.1 / 5
        per_element = -(xt * smoothed * options["weight"].view(1, -1, 1)).sum(1)
        expected = {"none": per_element, "sum": per_element.sum()}.get(
            reduction, per_element.sum() / per_element.numel()
        )
    torch.testing.assert_close(loss, expected)
    for mine, theirs in zip(ours, torch.autograd.grad(expected, (xt, pt), upstream), strict=True):
        torch.testing.assert_close(mine, theirs)
    assert torch.autograd.gradcheck(
        lambda x, p: nll_loss(x, p, from_logits=from_logits, **options), (xt, pt)
    )


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("shape", [(5,), (8, 5), (8, 5, 3)])
def test_torch_cross_entropy_module_on_every_target_form(shape, reduction, rng):
    x, p, w = (torch.from_numpy(a).float() for a in case(rng, shape))
    indices = p.argmax(dim=0 if len(shape) == 1 else 1)
    if indices.dim():
        indices.view(-1)[::3] = 1  # the ignore_index chosen below
    options = dict(weight=w, reduction=reduction, label_smoothing=0.1)
    ours = nllloss.torch.CrossEntropyLoss(**options)
    theirs = torch.nn.CrossEntropyLoss(**options)
    torch.testing.assert_close(ours(x, p), theirs(x, p))
    ours.ignore_index = theirs.ignore_index = 1
    torch.testing.assert_close(ours(x, indices), theirs(x, indices))
    with pytest.raises(ValueError, match=r"ignore_index is not supported .* probabilities"):
        ours(x, p)  # torch's RuntimeError: "ignore_index is not supported for floating..."
    # state_dict moves both ways; the options torch lacks are attributes, not state
    assert list(ours.state_dict()) == list(theirs.state_dict()) == ["weight"]
    fresh = nllloss.torch.CrossEntropyLoss(weight=torch.ones(x.shape[len(shape) > 1]))
    fresh.load_state_dict(theirs.state_dict())
    torch.nn.CrossEntropyLoss(weight=torch.ones_like(w)).load_state_dict(ours.state_dict())
    torch.testing.assert_close(fresh.weight, w)


def test_torch_bfloat16_takes_the_generic_path(rng):
    x, p, _w = case(rng, (9, 4), np.float32)
    x, p = x.astype(BFLOAT16), p.astype(BFLOAT16)
    loss = nll_loss(to_torch(x), to_torch(p), from_logits=True)
    _, expected = torch_loss(x.astype(np.float64), p.astype(np.float64), None, "mean")
    assert loss.dtype == torch.bfloat16
    assert_close(loss.float().numpy(), expected.detach().numpy(), BFLOAT16)


def test_errors_name_both_shapes_and_dtypes():
    x = np.zeros((4, 3), np.float32)
    with pytest.raises(ValueError, match=r"class probabilities.*\(4, 3\).*\(4, 2\)"):
        nll_loss(x, np.zeros((4, 2), np.float32), from_logits=True)
    # of the index shape: indices were meant, and the dtype is what is wrong (as in torch)
    with pytest.raises(TypeError, match=r"integer dtype.*float32 of shape \(4,\).*\(4, 3\)"):
        nll_loss(x, np.zeros(4, np.float32), from_logits=True)
    with pytest.raises(TypeError, match=r"\(4, 3\).*must be floating.*int64.*\(4,\)"):
        nll_loss(x, np.zeros((4, 3), np.int64), from_logits=True)
    # unbatched: torch's ValueError (the target's size), with the same hint
    with pytest.raises(ValueError, match=r"size: 3.*\(3,\).*must be floating"):
        nll_loss(np.zeros(3, np.float32), np.zeros(3, np.int32), from_logits=True)
    # one class, unbatched: a (1,) integer target is still a class index
    assert nll_loss(np.zeros(1), np.array([0]), from_logits=True) == 0.0


def test_distributed_and_total_weight_take_class_indices_only():
    with pytest.raises(TypeError, match="integer dtype"):
        nllloss.total_weight(np.zeros((2, 3)))
    from nllloss import _validate

    with pytest.raises(TypeError, match="integer dtype"):
        _validate.check_target(np.zeros((2, 3)), (2, 3), probabilities=False)

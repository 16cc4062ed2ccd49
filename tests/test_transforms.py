"""Every function transform of torch and JAX, and torch.compile, for every option.

torch 2.13 is the oracle: each result of ``nllloss`` under a transform is compared with the
same transform of torch's own function (``F.nll_loss``, ``F.cross_entropy``, or for options
torch lacks, ``torch_loss`` below: ATen's label-smoothing formula for log-probabilities and
"'sum' divided by total_weight" for ``total_weight``, in torch operations that every
transform handles). Batched results are checked against a Python loop of eager torch calls,
so the oracle of ``vmap`` does not itself rely on ``vmap``.

Options: plain, ``from_logits=True``, ``label_smoothing=0.1`` (and both), ``total_weight=``
(with 'mean', its only reduction); every reduction; weights on and off. Only the public API
is used, so these tests hold whatever the internal route of a call.

Out-of-range targets: where the target's values are known (eager calls, ``torch.func.grad``
or ``jacrev`` of the input, ``vmap`` over the input only, ``jax.grad`` of the input), the
error stays the ``IndexError`` of the eager call. Where they cannot be inspected (``vmap``
over the target, ``jax.jit``, ``jax.vmap`` over the target) nothing can be raised and no
data-dependent branch can be taken, so nllloss follows what JAX itself does under ``jit``:
the loss is NaN, never a finite wrong number -- the element's loss in 'none', the reduced
loss, and that row's gradient -- while the other examples of the batch stay exact.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import grad, jacrev, jvp, vmap

import nllloss
import nllloss.torch

jax.config.update("jax_enable_x64", True)  # as test_backends: int64 targets stay int64

IGNORE = -100
CLASSES = 5
EXAMPLES = 3  # the size of every vmapped axis
REDUCTIONS = ("none", "mean", "sum")
OPTIONS = {
    "plain": {},
    "from_logits": {"from_logits": True},
    "label_smoothing": {"label_smoothing": 0.1},
    "from_logits+label_smoothing": {"from_logits": True, "label_smoothing": 0.1},
    "total_weight": {"total_weight": 7.5},
}
# total_weight replaces the 'mean' denominator and is refused with other reductions
CASES = [
    pytest.param(name, reduction, id=f"{name}-{reduction}")
    for name in OPTIONS
    for reduction in (("mean",) if name == "total_weight" else REDUCTIONS)
]
# one example's input and target shapes: (N, C), unbatched (C,), and K-dim (N, C, d)
LAYOUTS = {
    "rows": ((4, CLASSES), (4,)),
    "unbatched": ((CLASSES,), ()),
    "kdim": ((2, CLASSES, 3), (2, 3)),
}
IN_DIMS = [
    pytest.param((0, None), id="input"),
    pytest.param((None, 0), id="target"),
    pytest.param((0, 0), id="both"),
]


@pytest.fixture(autouse=True)
def numpy_engine():
    """Overrides conftest's: the NumPy engine choice is not what these tests vary."""
    return "compiled"


def torch_loss(
    input, target, weight=None, reduction="mean", *,
    from_logits=False, label_smoothing=0.0, total_weight=None,
):  # fmt: skip
    """torch's loss for nllloss's options, from torch's own functions and ATen's formula."""
    reduce = "sum" if total_weight is not None else reduction
    if from_logits:
        loss = F.cross_entropy(
            input, target, weight=weight, reduction=reduce, label_smoothing=label_smoothing
        )
    else:
        loss = F.nll_loss(input, target, weight=weight, reduction=reduce)
        if label_smoothing:  # ATen's cross_entropy_loss_label_smoothing without log_softmax
            class_dim = 0 if input.dim() == 1 else 1
            classes = input.shape[class_dim]
            w = torch.ones(classes, dtype=input.dtype) if weight is None else weight
            shape = [1] * input.dim()
            shape[class_dim] = classes
            valid = target != IGNORE
            zero = torch.zeros((), dtype=input.dtype)  # not 0.0: forward AD would promote it
            smooth = torch.where(valid, -(input * w.reshape(shape)).sum(class_dim), zero)
            if reduce == "sum":
                smooth = smooth.sum()
            elif reduce == "mean":
                hit = torch.where(valid, w[torch.where(valid, target, 0)], zero)
                smooth = smooth.sum() / hit.sum()
            loss = (1 - label_smoothing) * loss + smooth * (label_smoothing / classes)
    return loss / total_weight if total_weight is not None else loss


def scalar(loss):
    """A scalar of the loss to differentiate: 'none' weighted by distinct upstream values."""
    if loss.dim() == 0:
        return loss
    upstream = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype)
    return (loss * upstream.reshape(loss.shape)).sum()


def close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6, equal_nan=True)


def batch(rng, layout, examples=EXAMPLES):
    """``examples`` problems of the layout: input, target (with ignored elements), weight."""
    x_shape, t_shape = LAYOUTS[layout]
    x = torch.from_numpy((rng.standard_normal((examples, *x_shape)) * 2).astype(np.float32))
    t = torch.from_numpy(rng.integers(0, CLASSES, (examples, *t_shape)))
    t.reshape(examples, -1)[::2, 0] = IGNORE  # unbatched: examples 0 and 2 are ignored
    w = torch.from_numpy(rng.uniform(0.2, 2.0, CLASSES).astype(np.float32))
    return x, t, w


def functions(options, reduction, weight):
    """(ours, torch's) as functions of (input, target)."""
    kwargs = {"weight": weight, "reduction": reduction, **options}
    return (
        lambda a, b: nllloss.nll_loss(a, b, **kwargs),
        lambda a, b: torch_loss(a, b, **kwargs),
    )


def examples(in_dims, x, t):
    """The per-example (input, target) pairs that vmap with ``in_dims`` sees."""
    return [
        (x[i] if in_dims[0] == 0 else x[0], t[i] if in_dims[1] == 0 else t[0])
        for i in range(EXAMPLES)
    ]


def looped_gradients(loss_fn, pairs):
    """The per-example gradients of ``loss_fn`` (torch's), one eager call per example."""
    return torch.stack([grad(lambda a, b: scalar(loss_fn(a, b)))(a, b) for a, b in pairs])


def vmap_arguments(in_dims, x, t):
    return (x if in_dims[0] == 0 else x[0], t if in_dims[1] == 0 else t[0])


# torch.func.vmap -------------------------------------------------------------------------


@pytest.mark.parametrize("in_dims", IN_DIMS)
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(("option", "reduction"), CASES)
def test_vmap(option, reduction, layout, weighted, in_dims, rng):
    """Per-example losses and per-example gradients (``vmap(grad(...))``) equal torch's."""
    x, t, w = batch(rng, layout)
    ours, theirs = functions(OPTIONS[option], reduction, w if weighted else None)
    pairs = examples(in_dims, x, t)

    loss = vmap(ours, in_dims=in_dims)(*vmap_arguments(in_dims, x, t))
    close(loss, torch.stack([theirs(a, b) for a, b in pairs]))

    per_example = vmap(grad(lambda a, b: scalar(ours(a, b))), in_dims=in_dims)
    expected = looped_gradients(theirs, pairs)
    close(per_example(*vmap_arguments(in_dims, x, t)), expected)


def test_vmap_of_the_modules(rng):
    x, t, w = batch(rng, "rows")
    for ours, theirs in [
        (nllloss.torch.NLLLoss(weight=w), torch.nn.NLLLoss(weight=w)),
        (
            nllloss.torch.CrossEntropyLoss(weight=w, label_smoothing=0.2, reduction="sum"),
            torch.nn.CrossEntropyLoss(weight=w, label_smoothing=0.2, reduction="sum"),
        ),
    ]:
        close(vmap(ours)(x, t), torch.stack([theirs(a, b) for a, b in zip(x, t, strict=True)]))
        per_example = vmap(grad(lambda a, b: ours(a, b)))(x, t)  # noqa: B023
        close(per_example, torch.stack([grad(theirs)(a, b) for a, b in zip(x, t, strict=True)]))


# torch.func.grad, jacrev, jvp -----------------------------------------------------------


@pytest.mark.parametrize("transform", ["grad", "jacrev", "jvp"])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(("option", "reduction"), CASES)
def test_function_transforms(option, reduction, layout, weighted, transform, rng):
    x, t, w = batch(rng, layout, examples=1)
    x, t = x[0], t[0]
    ours, theirs = functions(OPTIONS[option], reduction, w if weighted else None)
    if transform == "grad":
        close(grad(lambda a: scalar(ours(a, t)))(x), grad(lambda a: scalar(theirs(a, t)))(x))
    elif transform == "jacrev":
        close(jacrev(lambda a: ours(a, t))(x), jacrev(lambda a: theirs(a, t))(x))
    else:  # forward mode
        tangent = torch.from_numpy(rng.standard_normal(tuple(x.shape)).astype(np.float32))
        value, derivative = jvp(lambda a: ours(a, t), (x,), (tangent,))
        expected_value, expected_derivative = forward_ad(theirs, x, t, tangent)
        close(value, expected_value)
        close(derivative, expected_derivative)


def forward_ad(loss_fn, x, t, tangent):
    """(loss, its directional derivative) by torch.autograd.forward_ad. The oracle's forward
    mode: torch.func.jvp of torch's own ``loss * 0.9`` gives a float64 tangent for float32
    input (torch 2.13), which forward_ad does not."""
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        value, derivative = fwAD.unpack_dual(loss_fn(fwAD.make_dual(x, tangent), t))
    assert derivative is not None, "no tangent: the loss was not differentiated"
    return value, derivative


@pytest.mark.parametrize(("option", "reduction"), CASES)
def test_forward_ad(option, reduction, rng):
    """torch.autograd.forward_ad, the other forward mode: a tangent, and torch's."""
    x, t, w = batch(rng, "rows", examples=1)
    ours, theirs = functions(OPTIONS[option], reduction, w)
    tangent = torch.from_numpy(rng.standard_normal(tuple(x[0].shape)).astype(np.float32))
    for actual, expected in zip(
        forward_ad(ours, x[0], t[0], tangent), forward_ad(theirs, x[0], t[0], tangent), strict=True
    ):
        close(actual, expected)


# torch.compile ---------------------------------------------------------------------------

COMPILE_GROUPS = {
    "plain": ({}, REDUCTIONS),
    "from_logits": ({"from_logits": True}, REDUCTIONS),
    "label_smoothing": ({"label_smoothing": 0.1}, REDUCTIONS),
    "total_weight": ({"total_weight": 7.5}, ("mean",)),
}


@pytest.mark.parametrize("mode", ["inference", "training"])
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("group", COMPILE_GROUPS)
def test_compile_fullgraph(group, backend, mode, rng):
    """One compiled function computes the loss for every reduction, weights on and off (one
    compilation per option, backend and mode: inductor compiles C++ on CPU, slowly).

    Training differentiates every output at once, each with its own upstream gradient
    (exactly 1 for 'mean', as ``loss.backward()``), against eager torch."""
    import torch._dynamo

    options, reductions = COMPILE_GROUPS[group]
    x, t, w = batch(rng, "rows", examples=1)
    x, t = x[0], t[0]
    cases = [(r, weight) for r in reductions for weight in (None, w)]

    def losses(loss_fn, a):
        return [loss_fn(a, t, weight=weight, reduction=r, **options) for r, weight in cases]

    torch._dynamo.reset()
    compiled = torch.compile(lambda a: losses(nllloss.nll_loss, a), backend=backend, fullgraph=True)
    if mode == "inference":
        for actual, expected in zip(compiled(x), losses(torch_loss, x), strict=True):
            close(actual, expected)
        return
    ours, theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    actual, expected = compiled(ours), losses(torch_loss, theirs)
    for a, e in zip(actual, expected, strict=True):
        close(a.detach(), e.detach())
    upstream = [
        torch.ones(())
        if r == "mean"
        else torch.from_numpy(rng.uniform(0.5, 1.5, e.shape).astype(np.float32))
        for (r, _), e in zip(cases, expected, strict=True)
    ]
    (grad_ours,) = torch.autograd.grad(actual, ours, upstream)
    (grad_theirs,) = torch.autograd.grad(expected, theirs, upstream)
    close(grad_ours, grad_theirs)


def test_compile_the_modules_for_training(rng):
    import torch._dynamo

    x, t, w = batch(rng, "rows", examples=1)
    x, t = x[0], t[0]
    pairs = [
        (
            nllloss.torch.NLLLoss(weight=w, reduction="sum"),
            torch.nn.NLLLoss(weight=w, reduction="sum"),
        ),
        (
            nllloss.torch.CrossEntropyLoss(weight=w, label_smoothing=0.1),
            torch.nn.CrossEntropyLoss(weight=w, label_smoothing=0.1),
        ),
    ]
    for ours, theirs in pairs:
        torch._dynamo.reset()
        compiled = torch.compile(ours, backend="aot_eager", fullgraph=True)
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        loss, expected = compiled(a, t), theirs(b, t)
        close(loss.detach(), expected.detach())
        loss.backward()
        expected.backward()
        close(a.grad, b.grad)


# out-of-range targets --------------------------------------------------------------------


def bad_batch(rng, layout, value):
    """A batch whose example 1 has the out-of-range target ``value`` at its first element, and
    the same batch with that element ignored instead (torch's answer for the rest)."""
    x, t, w = batch(rng, layout)
    bad = t.clone()
    bad.reshape(EXAMPLES, -1)[1, 0] = value
    ignored = t.clone()
    ignored.reshape(EXAMPLES, -1)[1, 0] = IGNORE
    return x, bad, ignored, w


def first_row(grad_of_example, layout):
    """The gradient entries of the first target element of one example: its class row."""
    if layout == "unbatched":
        return grad_of_example
    if layout == "rows":
        return grad_of_example[0]
    return grad_of_example[0, :, 0]


@pytest.mark.parametrize("value", [CLASSES, -1, 2**40], ids=["C", "-1", "2**40"])
@pytest.mark.parametrize("in_dims", [IN_DIMS[1], IN_DIMS[2]])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(("option", "reduction"), CASES)
def test_vmap_over_an_out_of_range_target_gives_nan(option, reduction, layout, in_dims, value, rng):
    """vmap over the target: its values cannot be inspected, so (as JAX under jit) the bad
    element's loss, the reduced loss and that row's gradient are NaN, never a finite number and
    never "data-dependent control flow"; the examples without a bad target stay torch's."""
    x, bad, ignored, w = bad_batch(rng, layout, value)
    ours, theirs = functions(OPTIONS[option], reduction, w)
    pairs = examples(in_dims, x, ignored)

    loss = vmap(ours, in_dims=in_dims)(*vmap_arguments(in_dims, x, bad))
    expected = torch.stack([theirs(a, b) for a, b in pairs])
    if reduction == "none" and layout != "unbatched":
        assert torch.isnan(loss[1].reshape(-1)[0])
        close(loss.reshape(EXAMPLES, -1)[:, 1:], expected.reshape(EXAMPLES, -1)[:, 1:])
    else:
        assert torch.isnan(loss[1])
    close(loss[[0, 2]], expected[[0, 2]])

    per_example = vmap(grad(lambda a, b: scalar(ours(a, b))), in_dims=in_dims)
    gradient = per_example(*vmap_arguments(in_dims, x, bad))
    expected = looped_gradients(theirs, pairs)
    assert torch.isnan(first_row(gradient[1], layout)).any()
    close(gradient[[0, 2]], expected[[0, 2]])


@pytest.mark.parametrize(("option", "reduction"), CASES)
def test_out_of_range_targets_still_raise_where_they_can_be_read(option, reduction, rng):
    """Eager calls, grad/jacrev of the input and vmap over the input alone read the target."""
    x, bad, _, w = bad_batch(rng, "rows", CLASSES)
    ours, _ = functions(OPTIONS[option], reduction, w)
    x1, t1 = x[1], bad[1]
    match = f"Target {CLASSES} is out of bounds"
    with pytest.raises(IndexError, match=match):
        ours(x1, t1)
    with pytest.raises(IndexError, match=match):
        ours(x1.clone().requires_grad_(), t1)
    kwargs = {"weight": w, "reduction": reduction, **OPTIONS[option]}
    upstream = torch.ones(t1.shape if reduction == "none" else ())
    with pytest.raises(IndexError, match=match):
        nllloss.nll_loss_backward(upstream, x1, t1, **kwargs)
    with pytest.raises(IndexError, match=match):
        grad(lambda a: scalar(ours(a, t1)))(x1)
    with pytest.raises(IndexError, match=match):
        jacrev(lambda a: ours(a, t1))(x1)
    with pytest.raises(IndexError, match=match):
        vmap(ours, in_dims=(0, None))(x, t1)


@pytest.mark.parametrize("group", ["plain", "from_logits"])
def test_compiled_out_of_range_target_raises_or_is_nan(group, rng):
    """Compiled code never returns a finite loss for a bad target: an IndexError or NaN."""
    import torch._dynamo

    options = COMPILE_GROUPS[group][0]
    x, bad, _, w = bad_batch(rng, "rows", CLASSES)
    x1, t1 = x[1], bad[1]
    torch._dynamo.reset()
    compiled = torch.compile(
        lambda a: nllloss.nll_loss(a, t1, weight=w, **options), backend="aot_eager", fullgraph=True
    )
    for a in (x1, x1.clone().requires_grad_()):
        try:
            loss = compiled(a)
        except IndexError:
            continue
        assert torch.isnan(loss)


# JAX -------------------------------------------------------------------------------------


def jax_functions(options, reduction, weight):
    kwargs = {"reduction": reduction, **options}
    jw = None if weight is None else jnp.asarray(weight.numpy())
    return (
        lambda a, b: nllloss.nll_loss(a, b, weight=jw, **kwargs),
        lambda a, b: torch_loss(a, b, weight=weight, **kwargs),
    )


def jax_scalar(loss):
    if loss.ndim == 0:
        return loss
    return (loss * jnp.linspace(0.5, 1.5, loss.size, dtype=loss.dtype).reshape(loss.shape)).sum()


def close_jax(actual, expected):
    assert isinstance(actual, jax.Array)
    close(torch.from_numpy(np.array(actual)), expected)


JAX_IN_AXES = ((0, None), (None, 0), (0, 0))


@pytest.mark.parametrize(("option", "reduction"), CASES)
def test_jax_jit_grad_and_vmap(option, reduction, rng):
    """jax.grad, jax.vmap over the input, the target or both, and per-example gradients
    (vmap of grad), weights on and off, all under one jax.jit (one compilation: XLA takes
    seconds on CPU), against eager torch on the same numbers. One layout, (N, C) examples:
    the K-dim and unbatched ones run the same array-API code, tested through torch above."""
    x, t, w = batch(rng, "rows")
    jx, jt = jnp.asarray(x.numpy()), jnp.asarray(t.numpy())
    pairs = [jax_functions(OPTIONS[option], reduction, weight) for weight in (None, w)]

    def everything(jx, jt):
        results = []
        for ours, _ in pairs:
            results.append(ours(jx[0], jt[0]))
            gradient = jax.grad(lambda a, b: jax_scalar(ours(a, b)))  # noqa: B023
            results.append(gradient(jx[0], jt[0]))
            for in_axes in JAX_IN_AXES:
                arguments = vmap_arguments(in_axes, jx, jt)
                results.append(jax.vmap(ours, in_axes=in_axes)(*arguments))
                results.append(jax.vmap(gradient, in_axes=in_axes)(*arguments))
        return results

    expected = []
    for _, theirs in pairs:
        expected.append(theirs(x[0], t[0]))
        expected.append(grad(lambda a: scalar(theirs(a, t[0])))(x[0]))  # noqa: B023
        for in_axes in JAX_IN_AXES:
            examples_ = examples(in_axes, x, t)
            expected.append(torch.stack([theirs(a, b) for a, b in examples_]))
            expected.append(looped_gradients(theirs, examples_))
    actual = jax.jit(everything)(jx, jt)
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        close_jax(a, e)


@pytest.mark.parametrize(("option", "reduction"), CASES)
def test_jax_out_of_range_target(option, reduction, rng):
    """Under jit or vmap over the target: NaN (JAX's own rule), never a finite number; in an
    eager call or jax.grad of the input alone the target is concrete: the IndexError."""
    x, bad, ignored, w = bad_batch(rng, "rows", CLASSES)
    ours, theirs = jax_functions(OPTIONS[option], reduction, w)
    jx, jbad = jnp.asarray(x.numpy()), jnp.asarray(bad.numpy())

    loss = np.asarray(jax.jit(ours)(jx[1], jbad[1]))
    assert np.isnan(loss.reshape(-1)[0])
    if reduction == "none":
        close(torch.from_numpy(loss[1:]), theirs(x[1], ignored[1])[1:])
    gradient = np.asarray(jax.jit(jax.grad(lambda a, b: jax_scalar(ours(a, b))))(jx[1], jbad[1]))
    assert np.isnan(gradient[0]).any()

    batched = np.asarray(jax.vmap(ours)(jx, jbad))
    assert np.isnan(batched[1].reshape(-1)[0])
    close(torch.from_numpy(batched[[0, 2]]), torch.stack([theirs(x[i], bad[i]) for i in (0, 2)]))

    match = f"Target {CLASSES} is out of bounds"
    with pytest.raises(IndexError, match=match):
        ours(jx[1], jbad[1])
    with pytest.raises(IndexError, match=match):
        jax.grad(lambda a: jax_scalar(ours(a, jbad[1])))(jx[1])


# JAX: arrays closed over by the transformed function --------------------------------------

CLOSED_OVER_CASES = [
    pytest.param(kind, reduction, total, id=f"{kind}-{reduction}{'-total_weight' * total}")
    for kind in ("indices", "probabilities")
    for reduction in REDUCTIONS
    for total in ((False, True) if reduction == "mean" else (False,))
]


def _jax_transforms_of(ours, jx):
    """Every transform of ``ours`` (a function of the input alone, closing over the rest):
    jit, grad, grad of jit, jit of grad, vmap and jit of vmap over three inputs."""
    loss = jax.jit(ours)(jx[0])
    gradient = jax.grad(lambda a: jax_scalar(ours(a)))
    return [
        loss,
        gradient(jx[0]),
        jax.grad(lambda a: jax_scalar(jax.jit(ours)(a)))(jx[0]),
        jax.jit(gradient)(jx[0]),
        jax.vmap(ours)(jx),
        jax.jit(jax.vmap(ours))(jx),
        jax.jit(jax.vmap(gradient))(jx),
    ]


def _torch_transforms_of(theirs, x):
    """What ``_jax_transforms_of`` gives, from eager torch calls."""
    gradient = grad(lambda a: scalar(theirs(a)))(x[0])
    return [
        theirs(x[0]),
        gradient,
        gradient,
        gradient,
        torch.stack([theirs(a) for a in x]),
        torch.stack([theirs(a) for a in x]),
        torch.stack([grad(lambda a: scalar(theirs(a)))(a) for a in x]),
    ]


@pytest.mark.parametrize("from_logits", [False, True], ids=["log_probs", "from_logits"])
@pytest.mark.parametrize(("kind", "reduction", "total"), CLOSED_OVER_CASES)
def test_jax_closed_over_target_weight_and_total_weight(kind, reduction, total, from_logits, rng):
    """A target, weight and total_weight held as concrete arrays by a jitted function
    (inside jit every operation on them is traced, so no branch may read their values):
    nll_loss, nll_loss_backward and nll_loss_and_grad under jit, grad, vmap and their
    compositions, against eager torch."""
    x, t, w = batch(rng, "rows")
    if kind == "indices":
        target = t[0]
    else:
        target = torch.softmax(torch.from_numpy(rng.standard_normal((4, CLASSES))).float(), 1)
    jx, jt, jw = (jnp.asarray(a.numpy()) for a in (x, target, w))
    options = {"reduction": reduction, "from_logits": from_logits}
    jax_options = dict(options)
    if total:
        options["total_weight"] = 7.5
        jax_options["total_weight"] = jnp.asarray(7.5, jnp.float32)
    if kind == "indices":
        theirs = functools.partial(torch_loss, target=target, weight=w, **options)
    else:
        theirs = functools.partial(_torch_probability_loss, p=target, weight=w, **options)

    def ours(a):
        return nllloss.nll_loss(a, jt, jw, **jax_options)

    actual = _jax_transforms_of(ours, jx)
    for a, e in zip(actual, _torch_transforms_of(theirs, x), strict=True):
        close_jax(a, e)

    upstream = jnp.linspace(0.5, 1.5, actual[0].size, dtype=jnp.float32).reshape(actual[0].shape)
    torch_x = x[0].clone().requires_grad_()
    expected_loss = theirs(torch_x)
    expected_loss.backward(torch.from_numpy(np.array(upstream)))
    backward = jax.jit(lambda a: nllloss.nll_loss_backward(upstream, a, jt, jw, **jax_options))
    close_jax(backward(jx[0]), torch_x.grad)
    both = jax.jit(
        lambda a: nllloss.nll_loss_and_grad(a, jt, jw, grad_output=upstream, **jax_options)
    )
    loss, gradient = both(jx[0])
    close_jax(loss, expected_loss.detach())
    close_jax(gradient, torch_x.grad)


def _torch_probability_loss(
    input, p, weight, reduction, from_logits, total_weight=None
):  # fmt: skip
    """torch's loss of probability targets: cross_entropy's from logits; on
    log-probabilities (or divided by total_weight) cross_entropy's formula, -sum w p x."""
    if from_logits and total_weight is None:
        return F.cross_entropy(input, p, weight=weight, reduction=reduction)
    log_probs = torch.log_softmax(input, 1) if from_logits else input
    losses = -(log_probs * p * weight).sum(1)
    if reduction == "none":
        return losses
    if total_weight is not None:
        return losses.sum() / total_weight
    return losses.sum() if reduction == "sum" else losses.sum() / losses.numel()


def test_jax_total_weight_of_closed_over_arrays(rng):
    _, t, w = batch(rng, "rows")
    jt, jw = jnp.asarray(t[0].numpy()), jnp.asarray(w.numpy())
    valid = t[0] != IGNORE
    expected = w[t[0][valid]].sum()
    close_jax(jax.jit(lambda: nllloss.total_weight(jt, jw))(), expected)
    close_jax(jax.jit(lambda weight: nllloss.total_weight(jt, weight))(jw), expected)
    close_jax(jax.jit(lambda: nllloss.total_weight(jt))(), valid.sum())


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_jax_linear_cross_entropy_closed_over_and_grad_of_jit(reduction, rng):
    """The loss from hidden states with a closed-over target and class weight under jit,
    jax.grad of a jitted call (its custom_vjp once closed over the jit's tracers) and
    linear_cross_entropy_and_grad, against torch's cross_entropy(linear(h, W), t)."""
    h = rng.standard_normal((3, 6, 4)).astype(np.float32)
    layer = rng.standard_normal((CLASSES, 4)).astype(np.float32)
    t = rng.integers(0, CLASSES, 6)
    t[1] = IGNORE
    w = rng.uniform(0.2, 2.0, CLASSES).astype(np.float32)
    jh, jlayer, jt, jw = map(jnp.asarray, (h, layer, t, w))
    th, tlayer, tt, tw = map(torch.from_numpy, (h, layer, t, w))

    def ours(a, b):
        return nllloss.linear_cross_entropy(a, b, jt, weight=jw, reduction=reduction)

    def theirs(a, b):
        return F.cross_entropy(a @ b.T, tt, weight=tw, reduction=reduction)

    close_jax(jax.jit(lambda a: ours(a, jlayer))(jh[0]), theirs(th[0], tlayer))
    close_jax(jax.vmap(lambda a: ours(a, jlayer))(jh), torch.stack([theirs(a, tlayer) for a in th]))
    expected = grad(lambda a, b: scalar(theirs(a, b)), argnums=(0, 1))(th[0], tlayer)
    jitted = jax.jit(ours)
    close_jax(jitted(jh[0], jlayer), theirs(th[0], tlayer))
    gradient_of_jit = jax.grad(lambda a, b: jax_scalar(jitted(a, b)), argnums=(0, 1))
    jit_of_gradient = jax.jit(jax.grad(lambda a, b: jax_scalar(ours(a, b)), argnums=(0, 1)))
    for gradients in (gradient_of_jit(jh[0], jlayer), jit_of_gradient(jh[0], jlayer)):
        for a, e in zip(gradients, expected, strict=True):
            close_jax(a, e)

    # the loss and gradients in one call (its blocks' gradients once written in place)
    upstream = jnp.linspace(0.5, 1.5, 6, dtype=jnp.float32) if reduction == "none" else 1.0
    both = jax.jit(
        lambda a, b: nllloss.linear_cross_entropy_and_grad(
            a, b, jt, weight=jw, reduction=reduction, grad_output=upstream
        )
    )(jh[0], jlayer)
    close_jax(both[0], theirs(th[0], tlayer))
    for a, e in zip(both[1:3], expected, strict=True):
        close_jax(a, e)

    # every argument traced, as jax.grad(jax.jit(linear_cross_entropy))(h, W, t) is called
    whole = jax.grad(jax.jit(nllloss.linear_cross_entropy), argnums=(0, 1))(jh[0], jlayer, jt)
    unweighted = grad(lambda a, b: F.cross_entropy(a @ b.T, tt), argnums=(0, 1))(th[0], tlayer)
    for a, e in zip(whole, unweighted, strict=True):
        close_jax(a, e)


def test_jax_closed_over_out_of_range_target_is_nan_under_jit(rng):
    """A bad target closed over by a jitted function cannot raise there: NaN, as for a
    traced one, in nll_loss, total_weight and the loss from hidden states."""
    x, bad, _, w = bad_batch(rng, "rows", CLASSES)
    jx, jbad, jw = jnp.asarray(x[1].numpy()), jnp.asarray(bad[1].numpy()), jnp.asarray(w.numpy())
    assert np.isnan(jax.jit(lambda a: nllloss.nll_loss(a, jbad, from_logits=True))(jx))
    assert np.isnan(jax.jit(lambda: nllloss.total_weight(jbad, jw))())
    layer = jnp.asarray(rng.standard_normal((CLASSES, CLASSES)).astype(np.float32))
    assert np.isnan(jax.jit(lambda a: nllloss.linear_cross_entropy(a, layer, jbad))(jx))

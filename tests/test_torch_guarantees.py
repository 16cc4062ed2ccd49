"""torch's guarantees on every torch route of ``nll_loss`` and ``linear_cross_entropy``.

* Version counters: a tensor changed in place between the forward and a backward makes the
  backward raise torch's "modified by an inplace operation" error (or, where torch's own
  function keeps another tensor, give torch's forward-time gradient), never a gradient of
  the changed values.
* Double backward: a gradient penalty and ``gradgradcheck`` (float64) for every option.
* Autocast: the loss runs in float32, as torch's autocast runs ``nll_loss`` and
  ``cross_entropy``; the result is float32 and equal to torch's.
* ``torch.compile(fullgraph=True)`` for every target form (each integer dtype,
  probabilities with and without ``requires_grad``), every option, inference and training.
* ``label_smoothing`` given as a 0-d tensor, as torch's ``CrossEntropyLoss`` takes it.

Oracle: torch 2.13 itself (``F.cross_entropy``, ``F.nll_loss``, ``F.linear_cross_entropy``,
the same under ``torch.autocast``), and for the options torch lacks (``z_loss``,
``softcap``, ``total_weight``, smoothing of log-probabilities) :func:`reference`, float64
torch operations written here from the documented formulas and checked against
``F.cross_entropy`` where torch has the option.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import nllloss
import nllloss.torch
from nllloss import linear_cross_entropy, nll_loss

CLASSES = 5
IGNORE = -100
REDUCTIONS = ("none", "mean", "sum")
INPLACE = "modified by an inplace operation"


@pytest.fixture(autouse=True)
def numpy_engine():
    """Overrides conftest's: the tests that vary the NumPy engine say so themselves."""
    return "compiled"


@pytest.fixture
def ours_only(monkeypatch):
    """Small float32/float64 CPU calls go to our engines, not to torch's own kernel."""
    from nllloss._torch import engines

    monkeypatch.setattr(engines, "TORCH_KERNEL_MAX", 0)


def reference(
    x, t, weight=None, reduction="mean", *, from_logits=False, label_smoothing=0.0,
    z_loss=0.0, softcap=None, total_weight=None, ignore_index=IGNORE,
):  # fmt: skip
    """The loss of ``nllloss.nll_loss``'s docstring in torch operations, differentiable with
    respect to ``x`` and a target of probabilities; ``x`` is ``(N, C)``."""
    classes = x.shape[1]
    w = torch.ones(classes, dtype=x.dtype) if weight is None else weight
    z = x if softcap is None else softcap * torch.tanh(x / softcap)
    log_probs = torch.log_softmax(z, 1) if from_logits else x
    if t.is_floating_point():
        p = t * (1 - label_smoothing) + label_smoothing / classes
        losses = -(p * w * log_probs).sum(1)
        element_weight = torch.ones(x.shape[0], dtype=x.dtype)
        denominator = torch.tensor(float(x.shape[0]), dtype=x.dtype)
    else:
        t = t.long()
        valid = t != ignore_index
        safe = torch.where(valid, t, 0)
        element_weight = torch.where(valid, w[safe], 0.0)
        picked = log_probs.gather(1, safe[:, None])[:, 0]
        smooth = torch.where(valid, -(w * log_probs).sum(1), 0.0)
        losses = (1 - label_smoothing) * -(element_weight * picked)
        losses = losses + label_smoothing / classes * smooth
        denominator = element_weight.sum()
    if z_loss:
        losses = losses + z_loss * element_weight * torch.logsumexp(z, 1) ** 2
    if reduction == "none":
        return losses
    if reduction == "sum":
        return losses.sum()
    return losses.sum() / (denominator if total_weight is None else total_weight)


def logits_case(rng, dtype=torch.float64, rows=6):
    """Logits (N, C), class indices with one ignored, probabilities, a class weight."""
    x = torch.from_numpy(rng.standard_normal((rows, CLASSES)) * 2).to(dtype)
    t = torch.from_numpy(rng.integers(0, CLASSES, rows))
    t[1] = IGNORE
    p = torch.softmax(torch.from_numpy(rng.standard_normal((rows, CLASSES))), 1).to(dtype)
    w = torch.from_numpy(rng.uniform(0.5, 2.0, CLASSES)).to(dtype)
    return x, t, p, w


def linear_case(rng, dtype=torch.float64, rows=4, features=3, bias=True):
    """Hidden states, linear weight and bias, class indices (one ignored), class weight."""
    h = torch.from_numpy(rng.standard_normal((rows, features))).to(dtype)
    W = torch.from_numpy(rng.standard_normal((CLASSES, features))).to(dtype)
    b = torch.from_numpy(rng.standard_normal(CLASSES)).to(dtype) if bias else None
    t = torch.from_numpy(rng.integers(0, CLASSES, rows))
    t[1] = IGNORE
    w = torch.from_numpy(rng.uniform(0.5, 2.0, CLASSES)).to(dtype)
    return h, W, b, t, w


@pytest.mark.parametrize("option", [{}, {"label_smoothing": 0.2}])
def test_the_reference_is_torch_where_torch_has_the_options(option, rng):
    x, t, p, w = logits_case(rng)
    for target in (t, p):
        for reduction in REDUCTIONS:
            expected = F.cross_entropy(x, target, w, reduction=reduction, **option)
            actual = reference(x, target, w, reduction, from_logits=True, **option)
            torch.testing.assert_close(actual, expected, rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(reference(x, t, w), F.nll_loss(x, t, w), rtol=1e-13, atol=0)


# Version counters --------------------------------------------------------------------------


def changed_in_place(tensor: torch.Tensor) -> None:
    with torch.no_grad():
        if tensor.is_floating_point():
            tensor.mul_(2)
        else:
            tensor.copy_(torch.where(tensor == IGNORE, IGNORE, (tensor + 1) % CLASSES))


def backward_after_change(loss_fn, tensors: dict, changed: str):
    """``loss_fn(**tensors)``, the tensor ``changed`` changed in place, then the backward:
    the RuntimeError's message, or the gradients of the tensors that require grad."""
    loss = loss_fn(**tensors)
    changed_in_place(tensors[changed])
    differentiated = [v for v in tensors.values() if v is not None and v.requires_grad]
    upstream = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).reshape(loss.shape)
    try:
        return torch.autograd.grad(loss, differentiated, upstream)
    except RuntimeError as error:
        return str(error)


def linear_tensors(rng, changed):
    h, W, b, t, w = linear_case(rng)
    tensors = {"input": h, "linear_weight": W, "target": t, "linear_bias": b, "weight": w}
    for name in ("input", "linear_weight", "linear_bias"):
        tensors[name].requires_grad_()
    return tensors


@pytest.mark.parametrize("changed", ["input", "linear_weight", "linear_bias", "target", "weight"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_linear_cross_entropy_refuses_a_tensor_changed_in_place(reduction, changed, rng):
    """torch raises for the tensors its composition saves (all but the bias, whose
    gradient needs no value of it); ours saves the bias too, since its 'none' backward
    recomputes the logits: it raises for every one, and never returns the gradient of the
    changed values."""

    def ours(input, linear_weight, target, linear_bias, weight):
        return linear_cross_entropy(input, linear_weight, target, linear_bias=linear_bias,
                                    weight=weight, reduction=reduction)  # fmt: skip

    def theirs(input, linear_weight, target, linear_bias, weight):
        return F.linear_cross_entropy(input, linear_weight, target, linear_bias=linear_bias,
                                      weight=weight, reduction=reduction)  # fmt: skip

    result = backward_after_change(ours, linear_tensors(rng, changed), changed)
    expected = backward_after_change(theirs, linear_tensors(rng, changed), changed)
    assert isinstance(expected, str) == (changed != "linear_bias")
    assert isinstance(result, str)
    assert INPLACE in result


def test_linear_cross_entropy_second_backward_after_a_change_raises(rng):
    h, W, b, t, w = linear_case(rng)
    h.requires_grad_()  # then torch's composition saves W too
    W.requires_grad_()
    for loss_fn in (linear_cross_entropy, F.linear_cross_entropy):
        loss = loss_fn(h, W, t, linear_bias=b, weight=w, reduction="mean")
        loss.backward(retain_graph=True)
        changed_in_place(W)
        with pytest.raises(RuntimeError, match=INPLACE):
            loss.backward()


NLL_ROUTES = {
    "plain": {},
    "from_logits": {"from_logits": True},
    "label_smoothing": {"label_smoothing": 0.2},
    "probabilities": {"from_logits": True, "probabilities": True},
}


@pytest.mark.parametrize("changed", ["input", "target", "weight"])
@pytest.mark.parametrize("route", NLL_ROUTES)
def test_nll_loss_refuses_a_tensor_changed_in_place(route, changed, ours_only, rng):
    """torch's nll_loss and cross_entropy save the target and weight: both raise. torch's
    nll_loss also saves its input, cross_entropy the log-softmax instead (the input may
    change, the gradient stays the forward's): ours raises or gives torch's gradient."""
    options = dict(NLL_ROUTES[route])
    probabilities = options.pop("probabilities", False)

    x, t, p, w = logits_case(rng)
    case = {"input": x, "target": p if probabilities else t, "weight": w}

    def tensors():  # the same values for both, in tensors of their own
        copies = {name: value.clone() for name, value in case.items()}
        copies["input"].requires_grad_()
        return copies

    def ours(input, target, weight):
        return nll_loss(input, target, weight, reduction="none", **options)

    def theirs(input, target, weight):
        if options.get("from_logits"):
            smoothing = options.get("label_smoothing", 0.0)
            return F.cross_entropy(input, target, weight, reduction="none",
                                   label_smoothing=smoothing)  # fmt: skip
        if options.get("label_smoothing"):  # torch has no such loss: the composition
            return reference(input, target, weight, "none", **options)
        return F.nll_loss(input, target, weight, reduction="none")

    result = backward_after_change(ours, tensors(), changed)
    expected = backward_after_change(theirs, tensors(), changed)
    if changed == "input" and not isinstance(result, str):
        assert not isinstance(expected, str)
        torch.testing.assert_close(result, expected, rtol=1e-12, atol=1e-14)
        return
    assert isinstance(result, str)
    assert INPLACE in result
    if changed != "input" and route != "label_smoothing":  # torch's own functions raise
        assert isinstance(expected, str)
        assert INPLACE in expected


# Double backward ---------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_linear_cross_entropy_gradient_penalty(reduction, bias, rng):
    """``L + ||dL/dh||^2`` (create_graph=True) gives torch's gradients of W, b and h."""
    case = linear_case(rng, bias=bias)
    results = []
    for loss_fn in (linear_cross_entropy, F.linear_cross_entropy):
        h, W, b, t, w = (None if v is None else v.clone() for v in case)
        leaves = [v.requires_grad_() for v in (h, W, b) if v is not None]
        loss = loss_fn(h, W, t, linear_bias=b, weight=w, reduction=reduction).sum()
        (d_h,) = torch.autograd.grad(loss, h, create_graph=True)
        (loss + (d_h**2).sum()).backward()
        results.append([v.grad for v in leaves])
    for actual, expected in zip(*results, strict=True):
        torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-14)


LINEAR_OPTIONS = {
    "plain": {},
    "weight": {"weight": True},
    "ignore_index": {"ignore_index": 2},
    "label_smoothing": {"label_smoothing": 0.2, "weight": True},
    "z_loss": {"z_loss": 0.1},
    "softcap": {"softcap": 1.5},
    "probabilities": {"probabilities": True, "weight": True},
    "total_weight": {"total_weight": 3.5},
}


def ignoring(t, options):
    """The target, its ignored element set to the ``ignore_index`` of ``options``."""
    ignore_index = options.get("ignore_index", IGNORE)
    return torch.where(t == IGNORE, ignore_index, t)


def with_reductions(options: dict) -> list:
    """(option, reduction) pairs: ``total_weight`` is taken with 'mean' only."""
    return [
        (name, reduction)
        for name, option in options.items()
        for reduction in (("mean",) if "total_weight" in option else REDUCTIONS)
    ]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(("option", "reduction"), with_reductions(LINEAR_OPTIONS))
def test_linear_cross_entropy_gradgradcheck(option, reduction, bias, rng):
    options = dict(LINEAR_OPTIONS[option])
    h, W, b, t, w = linear_case(rng, bias=bias)
    t = ignoring(t, options)
    if options.pop("weight", False):
        options["weight"] = w
    if options.pop("probabilities", False):
        t = torch.softmax(torch.from_numpy(rng.standard_normal((h.shape[0], CLASSES))), 1)
    arguments = tuple(v.requires_grad_() for v in (h, W, b) if v is not None)

    def loss(h, W, b=None):
        return linear_cross_entropy(h, W, t, linear_bias=b, reduction=reduction, **options)

    assert torch.autograd.gradcheck(loss, arguments)
    assert torch.autograd.gradgradcheck(loss, arguments)


NLL_OPTIONS = {
    "plain": {},
    "ignore_index": {"ignore_index": 2},
    "label_smoothing": {"label_smoothing": 0.2},
    "probabilities": {"probabilities": True},
    "total_weight": {"total_weight": 3.5},
    "logits": {"from_logits": True},
    "logits+label_smoothing": {"from_logits": True, "label_smoothing": 0.2},
    "logits+probabilities": {"from_logits": True, "probabilities": True},
    "logits+z_loss+softcap": {"from_logits": True, "z_loss": 0.1, "softcap": 1.5},
}


@pytest.mark.parametrize("engine", ["torch kernel", "numba", "generic"])
@pytest.mark.parametrize(("option", "reduction"), with_reductions(NLL_OPTIONS))
def test_nll_loss_gradgradcheck(option, reduction, engine, monkeypatch, rng):
    """Every torch route of a CPU tensor: torch's kernel for small plain calls, else
    NumPy's kernels or the generic path; weights on."""
    from nllloss import _routes
    from nllloss._kernels import cpu
    from nllloss._torch import engines

    options = dict(NLL_OPTIONS[option])
    if engine != "torch kernel":
        monkeypatch.setattr(engines, "TORCH_KERNEL_MAX", 0)
    if engine == "generic":
        monkeypatch.setattr(cpu, "backend", cpu.generic_numpy)
        monkeypatch.setattr(_routes, "_BACKENDS", {})
    x, t, p, w = logits_case(rng)
    t = p if options.pop("probabilities", False) else ignoring(t, options)
    x.requires_grad_()

    def loss(x):
        return nll_loss(x, t, w, reduction=reduction, **options)

    assert torch.autograd.gradcheck(loss, (x,))
    assert torch.autograd.gradgradcheck(loss, (x,))


# Autocast ----------------------------------------------------------------------------------

AUTOCAST_DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64]


def autocast_pairs(w, smoothing):
    """(ours, torch's) as functions of (input, target) under autocast."""
    return {
        "CrossEntropyLoss": (
            nllloss.torch.CrossEntropyLoss(weight=w, label_smoothing=smoothing),
            torch.nn.CrossEntropyLoss(weight=w, label_smoothing=smoothing),
        ),
        "NLLLoss": (nllloss.torch.NLLLoss(weight=w), torch.nn.NLLLoss(weight=w)),
        "nll_loss": (lambda a, b: nll_loss(a, b, w), lambda a, b: F.nll_loss(a, b, w)),
        "nll_loss from logits": (
            lambda a, b: nll_loss(a, b, w, from_logits=True, label_smoothing=smoothing),
            lambda a, b: F.cross_entropy(a, b, w, label_smoothing=smoothing),
        ),
    }


@pytest.mark.parametrize(
    ("call", "target"),
    [  # torch's nll_loss takes class indices only
        ("CrossEntropyLoss", "indices"),
        ("CrossEntropyLoss", "probabilities"),
        ("NLLLoss", "indices"),
        ("nll_loss", "indices"),
        ("nll_loss from logits", "indices"),
        ("nll_loss from logits", "probabilities"),
    ],
)
@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES, ids=str)
def test_autocast_runs_the_loss_in_float32(dtype, call, target, rng):
    """torch's autocast runs nll_loss and cross_entropy in float32 (float64 stays): a
    16-bit input gives a float32 loss, its gradient in the input's dtype."""
    x, t, p, w = logits_case(rng, torch.float32, rows=16)
    # a float32 weight, as autocast leaves a module's buffers (torch refuses it with a
    # float64 input, whose dtype autocast keeps)
    w = w.to(torch.float64 if dtype == torch.float64 else torch.float32)
    ours, theirs = autocast_pairs(w, 0.1)[call]
    results = []
    for loss_fn in (ours, theirs):
        a = x.to(dtype).requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_fn(a, p.to(dtype) if target == "probabilities" else t)
        loss.backward()
        results.append((loss, a.grad))
    (loss, grad), (expected, expected_grad) = results
    assert loss.dtype == expected.dtype == (dtype if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(loss, expected, rtol=2e-6, atol=1e-7)
    assert grad.dtype == expected_grad.dtype == dtype
    torch.testing.assert_close(grad, expected_grad, rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("module", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_autocast_linear_cross_entropy_is_float32(dtype, module, rng):
    """torch's ``linear_cross_entropy`` under autocast: the product in bfloat16, the loss in
    float32. Ours computes the loss and its product in float32 (the logits are never
    rounded to 16 bits): a float32 result, the float32 composition's value, within
    bfloat16's rounding of torch's."""
    h, W, b, t, w = linear_case(rng, torch.float32, rows=32, features=16)
    h = h.to(dtype)

    def call(loss_fn, head, W, b):
        if not module:
            return loss_fn(head, W, t, linear_bias=b, weight=w)
        m = (nllloss.torch if loss_fn is linear_cross_entropy else torch.nn).LinearCrossEntropyLoss(
            16, CLASSES, bias=True, weight=w
        )
        with torch.no_grad():
            m.linear.weight.copy_(W)
            m.linear.bias.copy_(b)
        return m(head, t), m.linear.weight, m.linear.bias

    results = []
    for loss_fn in (linear_cross_entropy, F.linear_cross_entropy):
        head, Wi, bi = h.clone().requires_grad_(), W.clone().requires_grad_(), b.clone()
        bi.requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = call(loss_fn, head, Wi, bi)
        loss, Wi, bi = out if module else (out, Wi, bi)
        loss.backward()
        results.append((loss, head.grad, Wi.grad, bi.grad))
    ours, theirs = results
    for actual, expected in zip(ours, theirs, strict=True):
        assert actual.dtype == expected.dtype
    assert ours[0].dtype == torch.float32
    for actual, expected in zip(ours, theirs, strict=True):
        torch.testing.assert_close(actual, expected, rtol=2e-2, atol=2e-3)
    exact = F.cross_entropy(F.linear(h.float(), W, b), t, w)
    torch.testing.assert_close(ours[0], exact, rtol=2e-6, atol=1e-7)


def test_autocast_under_torch_compile(rng):
    import torch._dynamo

    x, t, _, w = logits_case(rng, torch.bfloat16)

    def loss(loss_fn, a):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return loss_fn(a, t, w, label_smoothing=0.1)

    torch._dynamo.reset()
    compiled = torch.compile(
        lambda a: loss(lambda *args, **kw: nll_loss(*args, **kw, from_logits=True), a),
        backend="aot_eager", fullgraph=True,
    )  # fmt: skip
    ours, theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    actual, expected = compiled(ours), loss(F.cross_entropy, theirs)
    assert actual.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(actual, expected, rtol=2e-6, atol=1e-7)
    actual.backward()
    expected.backward()
    torch.testing.assert_close(ours.grad, theirs.grad)


def test_autocast_linear_cross_entropy_under_torch_compile(rng):
    import torch._dynamo

    h, W, b, t, w = linear_case(rng, torch.float32)

    def loss(h, W):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return linear_cross_entropy(h, W, t, linear_bias=b, weight=w)

    torch._dynamo.reset()
    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    ours = [v.clone().requires_grad_() for v in (h, W)]
    theirs = [v.clone().requires_grad_() for v in (h, W)]
    actual = compiled(*ours)
    expected = F.cross_entropy(F.linear(theirs[0], theirs[1], b), t, w)  # all float32
    assert actual.dtype == torch.float32
    torch.testing.assert_close(actual, expected, rtol=2e-6, atol=1e-7)
    for got, want in zip(
        torch.autograd.grad(actual, ours), torch.autograd.grad(expected, theirs), strict=True
    ):
        torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-7)


# torch.compile -----------------------------------------------------------------------------

INTEGER_DTYPES = [torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.uint16,
                  torch.uint32]  # fmt: skip
COMPILE_OPTIONS = {
    "plain": {},
    "from_logits": {"from_logits": True},
    "label_smoothing": {"label_smoothing": 0.1},
    "from_logits+label_smoothing": {"from_logits": True, "label_smoothing": 0.1},
    "z_loss+softcap": {"from_logits": True, "z_loss": 0.01, "softcap": 3.0},
    "ignore_index": {"from_logits": True, "ignore_index": 2},
    "total_weight": {"total_weight": 4.5},
}
COMPILE_CASES = (
    [(str(d).removeprefix("torch."), o) for d in INTEGER_DTYPES for o in ("plain", "from_logits")]
    + [("int64", o) for o in COMPILE_OPTIONS if o not in ("plain", "from_logits")]
    + [(p, o) for p in ("probabilities", "probabilities requiring grad")
       for o in ("plain", "from_logits", "from_logits+label_smoothing", "z_loss+softcap")]
)  # fmt: skip


def compile_case(rng, target_form, option):
    x, t, p, w = logits_case(rng, torch.float32)
    options = dict(COMPILE_OPTIONS[option])
    if not options.get("from_logits"):
        x = torch.log_softmax(x, 1)
    if target_form.startswith("probabilities"):
        target = p.clone().requires_grad_(target_form.endswith("grad"))
    else:
        if target_form != "int64":  # unsigned: no -100; the ignored row ignores a class
            options.setdefault("ignore_index", 2)
        target = ignoring(t, options).to(getattr(torch, target_form))
    reductions = ("mean",) if "total_weight" in options else REDUCTIONS
    return x, target, w, options, reductions


def compiled_against_torch(rng, target_form, option, backend, mode):
    import torch._dynamo

    x, target, w, options, reductions = compile_case(rng, target_form, option)

    def losses(loss_fn, a, b):
        return [loss_fn(a, b, w, reduction=r, **options) for r in reductions]

    def theirs(a, b, w, reduction, **options):
        if target_form != "int64":
            b = b if b.is_floating_point() else b.long()
        return reference(a, b, w, reduction, **options)

    torch._dynamo.reset()
    compiled = torch.compile(lambda a, b: losses(nll_loss, a, b), backend=backend, fullgraph=True)
    training = mode == "training"
    a, a_ref = x.clone().requires_grad_(training), x.clone().requires_grad_(training)
    b, b_ref = target.clone(), target.detach().clone().requires_grad_(target.requires_grad)
    actual, expected = compiled(a, b), losses(theirs, a_ref, b_ref)
    for got, want in zip(actual, expected, strict=True):
        torch.testing.assert_close(got.detach(), want.detach(), rtol=1e-5, atol=1e-6)
    differentiated = [v for v in (a, b) if v.requires_grad]
    if not differentiated:
        return
    upstream = [torch.linspace(0.5, 1.5, e.numel()).reshape(e.shape) for e in expected]
    grads = torch.autograd.grad(actual, differentiated, upstream)
    expected_grads = torch.autograd.grad(
        expected, [v for v in (a_ref, b_ref) if v.requires_grad], upstream
    )
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["inference", "training"])
@pytest.mark.parametrize(("target_form", "option"), COMPILE_CASES)
def test_compile_every_target_form(target_form, option, mode, rng):
    compiled_against_torch(rng, target_form, option, "aot_eager", mode)


@pytest.mark.parametrize(
    ("target_form", "option", "mode"),
    [
        ("probabilities requiring grad", "from_logits", "training"),
        ("int32", "plain", "inference"),
        ("uint8", "from_logits+label_smoothing", "training"),
    ],
)
def test_compile_with_inductor(target_form, option, mode, rng):
    """Inductor compiles C++ on the CPU, slowly: a few cases."""
    compiled_against_torch(rng, target_form, option, "inductor", mode)


@pytest.mark.parametrize("target_form", ["indices", "probabilities requiring grad"])
def test_compile_linear_cross_entropy(target_form, rng):
    import torch._dynamo

    h, W, b, t, w = linear_case(rng, torch.float32)
    if target_form != "indices":
        t = torch.softmax(torch.from_numpy(rng.standard_normal((4, CLASSES))).float(), 1)
        t.requires_grad_()
    torch._dynamo.reset()
    compiled = torch.compile(linear_cross_entropy, backend="aot_eager", fullgraph=True)
    results = []
    for loss_fn in (compiled, F.linear_cross_entropy):
        leaves = [v.clone().requires_grad_() for v in (h, W, b)]
        target = t.detach().clone().requires_grad_(t.requires_grad)
        loss = loss_fn(leaves[0], leaves[1], target, linear_bias=leaves[2], weight=w)
        differentiated = leaves + ([target] if target.requires_grad else [])
        results.append((loss, *torch.autograd.grad(loss, differentiated)))
    for actual, expected in zip(*results, strict=True):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


# label_smoothing as a tensor ---------------------------------------------------------------

SMOOTHING_TENSORS = [
    torch.tensor(0.1),
    torch.tensor(0.1, dtype=torch.float64),
    torch.tensor(0.1, dtype=torch.bfloat16),
    torch.tensor(0),
]


@pytest.mark.parametrize("smoothing", SMOOTHING_TENSORS, ids=lambda s: str(s.dtype))
def test_label_smoothing_tensor(smoothing, rng):
    """torch's CrossEntropyLoss and linear_cross_entropy read a 0-d tensor as its float."""
    x, t, _, w = logits_case(rng, torch.float32)
    h, W, b, _, _ = linear_case(rng, torch.float32, rows=6)
    pairs = [
        (nllloss.torch.CrossEntropyLoss(w, label_smoothing=smoothing)(x, t),
         torch.nn.CrossEntropyLoss(w, label_smoothing=smoothing)(x, t)),
        (nll_loss(x, t, w, from_logits=True, label_smoothing=smoothing),
         F.cross_entropy(x, t, w, label_smoothing=smoothing)),
        (linear_cross_entropy(h, W, t, linear_bias=b, weight=w, label_smoothing=smoothing),
         F.linear_cross_entropy(h, W, t, linear_bias=b, weight=w, label_smoothing=smoothing)),
    ]  # fmt: skip
    ours = nllloss.torch.LinearCrossEntropyLoss(3, CLASSES, label_smoothing=smoothing)
    theirs = torch.nn.LinearCrossEntropyLoss(3, CLASSES, label_smoothing=smoothing)
    ours.load_state_dict(theirs.state_dict())
    pairs.append((ours(h, t), theirs(h, t)))
    for actual, expected in pairs:
        torch.testing.assert_close(actual, expected, rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize(
    "smoothing",
    [
        torch.tensor(0.1, requires_grad=True),
        torch.tensor([0.1]),
        torch.tensor(0.1, device="meta"),
    ],
    ids=["requires grad", "1-d", "meta"],
)
def test_label_smoothing_tensor_refused_where_torch_refuses(smoothing, rng):
    x, t, _, _ = logits_case(rng, torch.float32)
    with pytest.raises((TypeError, RuntimeError)) as theirs:
        F.cross_entropy(x, t, label_smoothing=smoothing)
    for call in (
        lambda: nllloss.torch.CrossEntropyLoss(label_smoothing=smoothing)(x, t),
        lambda: nll_loss(x, t, from_logits=True, label_smoothing=smoothing),
    ):
        with pytest.raises(theirs.type) as ours:
            call()
        assert "label_smoothing" in str(ours.value) or theirs.type is RuntimeError


def test_numpy_label_smoothing_scalar_array(rng):
    """The rule is one for every library: a 0-d NumPy array is a real number too."""
    x, t, _, w = logits_case(rng)
    expected = F.cross_entropy(x, t, w, label_smoothing=0.25).numpy()
    actual = nll_loss(x.numpy(), t.numpy(), w.numpy(), from_logits=True,
                      label_smoothing=np.array(0.25))  # fmt: skip
    np.testing.assert_allclose(actual, expected, rtol=1e-13)

"""The loss from hidden states (``linear_cross_entropy``) against torch 2.13's own
``F.linear_cross_entropy`` and the plain ``F.cross_entropy(F.linear(...))`` in float64."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import BFLOAT16, from_torch, to_torch

import nllloss
import nllloss.torch
from nllloss import linear_cross_entropy, linear_cross_entropy_and_grad

# float32 against float64: the GEMMs' rounding over D terms, then the loss's
TOLERANCES = {
    np.dtype(np.float64): {"rtol": 1e-10, "atol": 1e-12},
    np.dtype(np.float32): {"rtol": 2e-5, "atol": 2e-6},
    np.dtype(np.float16): {"rtol": 2e-3, "atol": 2e-3},
    BFLOAT16: {"rtol": 2e-2, "atol": 2e-2},
}


def _case(rows, features, classes, spatial=(), *, dtype=np.float32, bias=False, seed=0):
    rng = np.random.default_rng(seed)
    hidden_shape = (features,) if rows is None else (rows, features)
    h = rng.standard_normal(hidden_shape).astype(dtype)
    w = (rng.standard_normal((classes, *spatial, features)) / np.sqrt(features)).astype(dtype)
    b = rng.standard_normal((classes, *spatial)).astype(dtype) if bias else None
    target_shape = () if rows is None else (rows, *spatial)
    t = rng.integers(0, classes, target_shape)
    return h, w, b, t


def _torch64(a):
    if a is None:
        return None
    a = np.asarray(a)
    return torch.from_numpy(
        a.astype(np.float64) if a.dtype.kind == "f" or a.dtype == BFLOAT16 else a
    )


def _reference(h, w, t, b=None, *, grads=False, upstream=None, **options):
    """torch in float64: the loss of the plain composition (and its gradients), checked
    against torch's ``linear_cross_entropy`` where that accepts the call."""
    ht, wt, bt = _torch64(h), _torch64(w), _torch64(b)
    tt = _torch64(t)
    if grads:
        for a in (ht, wt, bt):
            if a is not None:
                a.requires_grad_()
    logits_shape = (*ht.shape[:-1], *wt.shape[:-1])
    logits = F.linear(ht, wt.reshape(-1, wt.shape[-1]), None if bt is None else bt.reshape(-1))
    options = dict(options)
    if options.get("ignore_index") is None:
        options.pop("ignore_index", None)
    loss = F.cross_entropy(logits.reshape(logits_shape), tt, **options)
    official = F.linear_cross_entropy(ht, wt, tt, linear_bias=bt, **options)
    torch.testing.assert_close(official, loss, rtol=1e-12, atol=1e-12, equal_nan=True)
    if not grads:
        return loss.detach().numpy()
    g = torch.ones_like(loss) if upstream is None else _torch64(upstream)
    found = torch.autograd.grad(loss, [a for a in (ht, wt, bt) if a is not None], g)
    found = [a.numpy() for a in found] + ([None] if bt is None else [])
    return loss.detach().numpy(), *found


def _close(actual, expected, dtype):
    if expected is None:
        assert actual is None
        return
    actual = np.asarray(actual)
    assert actual.dtype == np.dtype(dtype), (actual.dtype, dtype)
    assert actual.shape == np.shape(expected)
    np.testing.assert_allclose(
        actual.astype(np.float64), expected, equal_nan=True, **TOLERANCES[np.dtype(dtype)]
    )


SHAPES = [  # (rows or None for unbatched, features, classes, spatial)
    (None, 5, 7, ()),
    (1, 5, 7, ()),
    (13, 6, 11, ()),
    (9, 4, 5, (3,)),
    (4, 3, 4, (2, 3)),
]


@pytest.mark.parametrize(("rows", "features", "classes", "spatial"), SHAPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk_rows", [None, 1, 4])
def test_values_and_gradients_match_torch(
    rows, features, classes, spatial, reduction, bias, chunk_rows
):
    h, w, b, t = _case(rows, features, classes, spatial, bias=bias)
    if t.ndim:
        t.reshape(-1)[::3] = -100
    expected = _reference(h, w, t, b, grads=True, reduction=reduction)
    got = linear_cross_entropy_and_grad(
        h, w, t, linear_bias=b, reduction=reduction, chunk_rows=chunk_rows
    )
    for a, e in zip(got, expected, strict=True):
        _close(a, e, np.float32)
    loss = linear_cross_entropy(h, w, t, linear_bias=b, reduction=reduction, chunk_rows=chunk_rows)
    _close(loss, expected[0], np.float32)


@pytest.mark.parametrize("options", [
    {"weight": np.array([0.5, 2.0, 1.0, 0.0, 3.0, 1.5, 1.0], np.float32)},
    {"label_smoothing": 0.2},
    {"ignore_index": 2},
    {"ignore_index": None},
    {"label_smoothing": 0.1, "weight": np.linspace(0.5, 2.0, 7, dtype=np.float32)},
])  # fmt: skip
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_options_match_torch(options, reduction):
    h, w, b, t = _case(10, 6, 7, bias=True)
    t[4] = -100 if options.get("ignore_index") is None else options["ignore_index"]
    ref_options = {k: _torch64(v) if k == "weight" else v for k, v in options.items()}
    expected = _reference(h, w, t, b, grads=True, reduction=reduction, **ref_options)
    got = linear_cross_entropy_and_grad(
        h, w, t, linear_bias=b, reduction=reduction, chunk_rows=3, **options
    )
    for a, e in zip(got, expected, strict=True):
        _close(a, e, np.float32)


@pytest.mark.parametrize(("rows", "spatial"), [(None, ()), (8, ()), (5, (3,))])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_probability_targets(rows, spatial, reduction):
    h, w, b, _ = _case(rows, 4, 6, spatial, bias=True, seed=1)
    rng = np.random.default_rng(2)
    logits_shape = (6, *spatial) if rows is None else (rows, 6, *spatial)
    p = rng.random(logits_shape).astype(np.float32)
    p /= p.sum(axis=0 if rows is None else 1, keepdims=True)
    expected = _reference(h, w, p, b, grads=True, reduction=reduction, label_smoothing=0.1)
    got = linear_cross_entropy_and_grad(
        h, w, p, linear_bias=b, reduction=reduction, label_smoothing=0.1, chunk_rows=3
    )
    for a, e in zip(got, expected, strict=True):
        _close(a, e, np.float32)


def test_total_weight_makes_pieces_add_up():
    h, w, b, t = _case(12, 5, 8, bias=True)
    t[[1, 7]] = -100
    whole = _reference(h, w, t, b, grads=True)
    total = nllloss.total_weight(t)
    pieces = [
        linear_cross_entropy_and_grad(h[s], w, t[s], linear_bias=b, total_weight=total)
        for s in (slice(0, 5), slice(5, 12))
    ]
    _close(pieces[0][0] + pieces[1][0], whole[0], np.float32)
    _close(np.concatenate([pieces[0][1], pieces[1][1]]), whole[1], np.float32)
    _close(pieces[0][2] + pieces[1][2], whole[2], np.float32)
    _close(pieces[0][3] + pieces[1][3], whole[3], np.float32)


def test_z_loss_and_softcap_equal_the_composed_loss():
    """Options torch lacks: against nll_loss of the float64 logits made by torch."""
    h, w, b, t = _case(9, 5, 6, bias=True)
    logits = F.linear(_torch64(h), _torch64(w), _torch64(b)).numpy()
    for reduction in ("mean", "sum", "none"):
        expected = nllloss.nll_loss(
            logits, t, reduction=reduction, from_logits=True, z_loss=1e-2, softcap=3.0
        )
        got = linear_cross_entropy(
            h, w, t, linear_bias=b, reduction=reduction, z_loss=1e-2, softcap=3.0, chunk_rows=4
        )
        _close(got, expected, np.float32)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_batch_and_all_ignored(reduction):
    h, w, b, t = _case(0, 4, 5, bias=True)
    expected = _reference(h, w, t, b, grads=True, reduction=reduction)
    got = linear_cross_entropy_and_grad(h, w, t, linear_bias=b, reduction=reduction)
    for a, e in zip(got, expected, strict=True):
        _close(a, e, np.float32)
    h, w, b, t = _case(6, 4, 5, bias=True)
    t[:] = -100
    expected = _reference(h, w, t, b, grads=True, reduction=reduction)
    got = linear_cross_entropy_and_grad(h, w, t, linear_bias=b, reduction=reduction, chunk_rows=4)
    for a, e in zip(got, expected, strict=True):
        _close(a, e, np.float32)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_probability_targets_of_no_class(reduction):
    """C = 0 with probability targets: torch's 'mean' divides by numel / C (NaN), as
    nll_loss does; a block loop that counted the rows instead gave 0."""
    h = np.ones((3, 4))
    w, p = np.zeros((0, 4)), np.zeros((3, 0))
    expected = F.linear_cross_entropy(
        torch.from_numpy(h), torch.from_numpy(w), torch.from_numpy(p), reduction=reduction
    )
    got = linear_cross_entropy(h, w, p, reduction=reduction, chunk_rows=2)
    np.testing.assert_array_equal(got, expected.numpy())


def test_upstream_gradient_per_element():
    h, w, b, t = _case(7, 4, 5, bias=True)
    g = np.linspace(-1.0, 2.0, 7).astype(np.float32)
    expected = _reference(h, w, t, b, grads=True, upstream=g, reduction="none")
    got = linear_cross_entropy_and_grad(
        h, w, t, linear_bias=b, reduction="none", grad_output=g, chunk_rows=3
    )
    for a, e in zip(got, expected, strict=True):
        _close(a, e, np.float32)


@pytest.mark.parametrize("dtype", [np.float64, np.float16, BFLOAT16])
def test_dtypes(dtype):
    h, w, b, t = _case(9, 8, 10, dtype=dtype, bias=True)
    expected = _reference(h, w, t, b, grads=True)
    got = linear_cross_entropy_and_grad(h, w, t, linear_bias=b, chunk_rows=4)
    for a, e in zip(got, expected, strict=True):
        _close(a, e, dtype)


def test_chunk_sizes_agree_to_rounding_and_runs_are_bitwise_equal():
    h, w, b, t = _case(50, 16, 40, bias=True)
    results = [
        linear_cross_entropy_and_grad(h, w, t, linear_bias=b, chunk_rows=c) for c in (1, 7, 50)
    ]
    for other in results[1:]:
        for a, e in zip(other, results[0], strict=True):
            np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-7)
    again = linear_cross_entropy_and_grad(h, w, t, linear_bias=b, chunk_rows=7)
    for a, e in zip(again, results[1], strict=True):
        np.testing.assert_array_equal(a, e)


def test_thread_counts_give_the_same_bits():
    h, w, b, t = _case(300, 32, 500, bias=True)
    ht, wt, bt, tt = map(torch.from_numpy, (h, w, b, t))
    import numba

    threads, numba_threads = torch.get_num_threads(), numba.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            nllloss.set_num_threads(n)
            results.append(linear_cross_entropy_and_grad(h, w, t, linear_bias=b, chunk_rows=64))
            results.append(linear_cross_entropy_and_grad(ht, wt, tt, linear_bias=bt, chunk_rows=64))
    finally:
        torch.set_num_threads(threads)
        nllloss.set_num_threads(numba_threads)
    for first, second in ((results[0], results[2]), (results[1], results[3])):
        for a, e in zip(first, second, strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(e))


def test_torch_blocks_on_one_thread_give_the_same_bits_and_restore_the_count(monkeypatch):
    """Blocks that run on one thread (``TorchAlgebra.threads``) compute what threads do, and
    torch's thread count is restored after each, also when the block raises."""
    from nllloss._hidden_states import torch as _linear_torch
    from nllloss._kernels.cpu._threads import Pace

    h, w, b, t = map(torch.from_numpy, _case(300, 32, 500, bias=True))
    seen = []
    logits = _linear_torch.TorchAlgebra.logits

    def recording(linear, hidden, buffer):
        seen.append(torch.get_num_threads())
        return logits(linear, hidden, buffer)

    monkeypatch.setattr(_linear_torch.TorchAlgebra, "logits", staticmethod(recording))
    monkeypatch.setattr(_linear_torch, "_paces", {})
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        monkeypatch.setattr(Pace, "use_threads", lambda self: True)
        on_threads = linear_cross_entropy_and_grad(h, w, t, linear_bias=b, chunk_rows=64)
        choices = iter([True, False] * 5)
        monkeypatch.setattr(Pace, "use_threads", lambda self: next(choices))
        mixed = linear_cross_entropy_and_grad(h, w, t, linear_bias=b, chunk_rows=64)
        assert seen == [2] * 5 + [2, 1, 2, 1, 2]
        assert torch.get_num_threads() == 2
        for a, e in zip(mixed, on_threads, strict=True):
            torch.testing.assert_close(a, e, rtol=0, atol=0)
        monkeypatch.setattr(Pace, "use_threads", lambda self: False)

        def failing(*args, **kwargs):
            raise RuntimeError("in the block")

        from nllloss._routes import backend_for

        monkeypatch.setattr(type(backend_for(h)), "forward_backward", failing)
        with pytest.raises(RuntimeError, match="in the block"):
            linear_cross_entropy_and_grad(h, w, t, linear_bias=b, chunk_rows=64)
        assert seen[-1] == 1
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


def test_torch_blocks_learn_one_thread_where_it_is_faster(monkeypatch):
    """A block's time is recorded for the way it ran, per unit of work: blocks that took
    twice as long on threads run on one thread next, then threads are tried again."""
    import types

    from nllloss._hidden_states import torch as _linear_torch

    h, w, _, t = _case(64, 16, 300)
    h, w, t = map(torch.from_numpy, (h, w, t))
    clock = iter([0.0, 2.0, 0.0, 1.0] * 2)  # (start, stop): threads 2 s, one thread 1 s
    fake_time = types.SimpleNamespace(perf_counter=lambda: next(clock))
    monkeypatch.setattr(_linear_torch, "time", fake_time)
    monkeypatch.setattr(_linear_torch, "_paces", {})
    seen = []
    logits = _linear_torch.TorchAlgebra.logits

    def recording(linear, hidden, buffer):
        seen.append(torch.get_num_threads())
        return logits(linear, hidden, buffer)

    monkeypatch.setattr(_linear_torch.TorchAlgebra, "logits", staticmethod(recording))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for _ in range(4):
            linear_cross_entropy_and_grad(h, w, t, chunk_rows=64)
    finally:
        torch.set_num_threads(threads)
    assert seen == [2, 1, 2, 1]
    (pace,) = _linear_torch._paces.values()
    work = 64 * 300 * 16
    assert pace.parallel == [2.0 / work]
    assert pace.serial == [1.0 / work] * 2


def test_out_buffers():
    h, w, b, t = _case(11, 5, 9, bias=True)
    expected = linear_cross_entropy_and_grad(h, w, t, linear_bias=b, chunk_rows=4)
    outs = (np.empty_like(h), np.empty_like(w), np.empty_like(b))
    got = linear_cross_entropy_and_grad(h, w, t, linear_bias=b, chunk_rows=4, out=outs)
    for a, o, e in zip(got[1:], outs, expected[1:], strict=True):
        assert a is o
        np.testing.assert_array_equal(a, e)
    overwritten = h.copy()
    got = linear_cross_entropy_and_grad(
        overwritten, w, t, linear_bias=b, chunk_rows=4, out=(overwritten, None, None)
    )
    np.testing.assert_array_equal(overwritten, expected[1])
    with pytest.raises(ValueError, match="d_linear_weight"):
        linear_cross_entropy_and_grad(h, w, t, out=(None, w, None))


# --- torch tensors -------------------------------------------------------------------------


@pytest.mark.parametrize(("rows", "features", "classes", "spatial"), SHAPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_torch_autograd_matches_torch(rows, features, classes, spatial, reduction):
    h, w, b, t = _case(rows, features, classes, spatial, bias=True, dtype=np.float64)
    expected = _reference(h, w, t, b, grads=True, reduction=reduction)
    ht, wt, bt = (torch.from_numpy(a.copy()).requires_grad_() for a in (h, w, b))
    loss = linear_cross_entropy(
        ht, wt, torch.from_numpy(t), linear_bias=bt, reduction=reduction, chunk_rows=2
    )
    loss.backward(torch.ones_like(loss))
    for a, e in zip((loss, ht.grad, wt.grad, bt.grad), expected, strict=True):
        _close(from_torch(a), e, np.float64)


def test_torch_float32_and_second_backward():
    h, w, b, t = _case(10, 6, 9, bias=True)
    expected = _reference(h, w, t, b, grads=True, upstream=np.float64(3.0))
    ht, wt, bt = (torch.from_numpy(a.copy()).requires_grad_() for a in (h, w, b))
    loss = linear_cross_entropy(ht, wt, torch.from_numpy(t), linear_bias=bt, chunk_rows=4)
    loss.backward(torch.tensor(3.0), retain_graph=True)
    first = [a.grad.clone() for a in (ht, wt, bt)]
    for a, e in zip((ht.grad, wt.grad, bt.grad), expected[1:], strict=True):
        _close(from_torch(a), e, np.float32)
    for a in (ht, wt, bt):
        a.grad = None
    loss.backward(torch.tensor(3.0))  # recomputed: the kept gradients were used once
    for a, e in zip((ht.grad, wt.grad, bt.grad), first, strict=True):
        torch.testing.assert_close(a, e)


def test_torch_only_some_arguments_need_grad():
    h, w, _, t = _case(6, 4, 5)
    ht, wt = torch.from_numpy(h), torch.from_numpy(w).requires_grad_()
    expected = _reference(h, w, t, grads=True)
    linear_cross_entropy(ht, wt, torch.from_numpy(t)).backward()
    _close(from_torch(wt.grad), expected[2], np.float32)
    assert ht.grad is None


def test_torch_bfloat16_computes_in_float32():
    h, w, b, t = _case(7, 8, 10, dtype=BFLOAT16, bias=True)
    expected = _reference(h, w, t, b)
    got = linear_cross_entropy(
        to_torch(h), to_torch(w), torch.from_numpy(t), linear_bias=to_torch(b)
    )
    assert got.dtype == torch.bfloat16
    _close(from_torch(got), expected, BFLOAT16)


def test_module_is_a_drop_in():
    torch.manual_seed(0)
    ours = nllloss.torch.LinearCrossEntropyLoss(
        6, 5, out_features=(2,), bias=True, label_smoothing=0.1
    )
    theirs = torch.nn.LinearCrossEntropyLoss(
        6, 5, out_features=(2,), bias=True, label_smoothing=0.1
    )
    assert isinstance(ours, torch.nn.LinearCrossEntropyLoss)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    theirs.load_state_dict(ours.state_dict())
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(4, 6, dtype=torch.float32)
    t = torch.randint(0, 5, (4, 2))
    expected = theirs(x, t)
    expected.backward()
    got = ours(x, t)
    got.backward()
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(ours.linear.weight.grad, theirs.linear.weight.grad)
    torch.testing.assert_close(ours.linear.bias.grad, theirs.linear.bias.grad)
    weighted = nllloss.torch.LinearCrossEntropyLoss(3, 4, weight=torch.ones(4))
    assert sorted(weighted.state_dict()) == sorted(
        torch.nn.LinearCrossEntropyLoss(3, 4, weight=torch.ones(4)).state_dict()
    )


def test_torch_func_transforms_take_the_composed_loss():
    h, w, _, t = _case(5, 4, 6)
    expected = _reference(h, w, t, grads=True)
    grad = torch.func.grad(
        lambda h: linear_cross_entropy(h, torch.from_numpy(w), torch.from_numpy(t))
    )(torch.from_numpy(h))
    _close(from_torch(grad), expected[1], np.float32)


def test_torch_probability_targets_that_require_grad():
    h, w, _, _ = _case(4, 3, 5)
    p = torch.softmax(torch.randn(4, 5, dtype=torch.float64), 1).requires_grad_()
    expected = torch.autograd.grad(F.linear_cross_entropy(_torch64(h), _torch64(w), p), p)[0]
    got = torch.autograd.grad(linear_cross_entropy(_torch64(h), _torch64(w), p), p)[0]
    torch.testing.assert_close(got, expected)


# --- JAX, Dask, array-api-strict -----------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("rows", [None, 1, 10])
def test_jax_grad_under_jit(reduction, rows):
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    h, w, b, t = _case(rows, 5, 7, bias=True)
    if t.size > 2:
        t[2] = -100
    g = np.arange(1.0, 11.0)[: rows or 0] if reduction == "none" and rows else 1.0
    expected = _reference(h, w, t, b, grads=True, reduction=reduction, upstream=g)

    def scalar(h, w, b):
        loss = linear_cross_entropy(
            h, w, jnp.asarray(t), linear_bias=b, reduction=reduction, chunk_rows=3
        )
        return jnp.sum(loss * jnp.asarray(g, dtype=loss.dtype))

    loss = jax.jit(
        lambda h, w, b: linear_cross_entropy(
            h, w, jnp.asarray(t), linear_bias=b, reduction=reduction, chunk_rows=3
        )
    )(*map(jnp.asarray, (h, w, b)))
    grads = jax.jit(jax.grad(scalar, argnums=(0, 1, 2)))(*map(jnp.asarray, (h, w, b)))
    _close(np.asarray(loss), expected[0], np.float32)
    for a, e in zip(grads, expected[1:], strict=True):
        _close(np.asarray(a), e, np.float32)


@pytest.mark.parametrize("dtype", [np.float16, BFLOAT16])
def test_jax_sixteen_bit_and_probabilities(dtype):
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    h, w, b, _ = _case(6, 4, 5, dtype=np.float32, bias=True)
    p = np.random.default_rng(3).dirichlet(np.ones(5), 6).astype(np.float32)
    h, w, b = (a.astype(dtype) for a in (h, w, b))
    expected = _reference(h, w, p, b, grads=True, label_smoothing=0.1)

    def loss(h, w, b):
        return linear_cross_entropy(h, w, jnp.asarray(p), linear_bias=b, label_smoothing=0.1)

    value, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(
        *(jnp.asarray(a.astype(np.float32)).astype(jnp.dtype(dtype)) for a in (h, w, b))
    )
    _close(np.asarray(value), expected[0], dtype)
    for a, e in zip(grads, expected[1:], strict=True):
        _close(np.asarray(a), e, dtype)


def test_sixteen_bit_out_buffers():
    h, w, b, t = _case(7, 4, 6, dtype=np.float16, bias=True)
    expected = linear_cross_entropy_and_grad(h, w, t, linear_bias=b, chunk_rows=3)
    outs = (np.empty_like(h), np.empty_like(w), np.empty_like(b))
    got = linear_cross_entropy_and_grad(h, w, t, linear_bias=b, chunk_rows=3, out=outs)
    for a, o, e in zip(got[1:], outs, expected[1:], strict=True):
        assert a is o
        np.testing.assert_array_equal(a, e)


@pytest.mark.parametrize("library", ["dask", "array_api_strict"])
def test_other_array_libraries(library):
    h, w, b, t = _case(10, 5, 7, bias=True)
    expected = _reference(h, w, t, b, grads=True)
    if library == "dask":
        da = pytest.importorskip("dask.array")
        convert = lambda a: da.from_array(a, chunks=4)  # noqa: E731
    else:
        xp = pytest.importorskip("array_api_strict")
        convert = xp.asarray
    got = linear_cross_entropy_and_grad(
        *map(convert, (h, w, t)), linear_bias=convert(b), chunk_rows=4
    )
    for a, e in zip(got, expected, strict=True):
        _close(np.asarray(a), e, np.float32)


# --- Errors -----------------------------------------------------------------------------


@pytest.mark.parametrize(("h_shape", "w_shape", "b_shape", "error", "match"), [
    ((3, 4), (5, 6), None, ValueError, "input's last dimension"),
    ((2, 3, 4), (5, 4), None, ValueError, "input must have shape"),
    ((3, 4), (5,), None, ValueError, "linear_weight must have shape"),
    ((3, 4), (5, 4), (6,), ValueError, "linear_bias must have shape"),
    ((4,), (5, 2, 4), None, ValueError, "needs a batched input"),
])  # fmt: skip
def test_shape_errors_name_the_argument(h_shape, w_shape, b_shape, error, match):
    h = np.zeros(h_shape, np.float32)
    w = np.zeros(w_shape, np.float32)
    b = None if b_shape is None else np.zeros(b_shape, np.float32)
    t = np.zeros(h_shape[:1] if len(h_shape) > 1 else (), np.int64)
    with pytest.raises(error, match=match):
        linear_cross_entropy(h, w, t, linear_bias=b)


def test_other_errors():
    h, w, b, t = _case(3, 4, 5, bias=True)
    with pytest.raises(TypeError, match="linear_weight must have the input's dtype"):
        linear_cross_entropy(h, w.astype(np.float64), t)
    with pytest.raises(TypeError, match="hidden states of a floating dtype"):
        linear_cross_entropy(h.astype(np.int32), w, t)
    with pytest.raises(ValueError, match="Expected input batch_size"):
        linear_cross_entropy(h, w, t[:2])
    with pytest.raises(ValueError, match="chunk_rows"):
        linear_cross_entropy(h, w, t, chunk_rows=0)
    with pytest.raises(TypeError, match="linear_bias"):
        linear_cross_entropy(h, w, t, linear_bias=torch.from_numpy(b))
    bad = t.copy()
    bad[2] = 7
    with pytest.raises(IndexError, match=r"target\[2\] = 7"):
        linear_cross_entropy(h, w, bad, chunk_rows=1)


def test_memory_is_one_block_of_logits():
    """NumPy allocations beyond the results, traced: a block of logits, not N x C."""
    import tracemalloc

    h, w, b, t = _case(2048, 16, 4000, bias=True)
    linear_cross_entropy_and_grad(h, w, t, linear_bias=b, chunk_rows=32)  # caches warm
    tracemalloc.start()
    try:
        linear_cross_entropy_and_grad(h, w, t, linear_bias=b, chunk_rows=32)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    results = h.nbytes + w.nbytes + b.nbytes
    logits = 2048 * 4000 * 4  # 33 MB; a block of 32 rows is 0.5 MB
    assert peak - results < logits / 8, (peak - results, logits)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_numpy_loss_of_several_blocks_is_a_0d_array(reduction):
    """The reduced loss is a 0-d NumPy array whether one block or several computed it."""
    h, w, _, t = _case(100, 8, 30)
    for chunk_rows in (None, 16):
        loss = linear_cross_entropy(h, w, t, reduction=reduction, chunk_rows=chunk_rows)
        assert type(loss) is np.ndarray
        assert loss.shape == ()
        assert loss.dtype == h.dtype

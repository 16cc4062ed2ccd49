"""nllloss.distributed.token_stats and linear_token_stats on 2 gloo ranks (CPU) against
the float64 torch composition of the unsharded logits (``test_token_stats.oracle``),
values and gradients."""

from __future__ import annotations

import datetime
import os
import pickle
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing
from test_token_stats import oracle

import nllloss.distributed

WORLD = 2
CLASSES = 11
SHARDS = ((0, 6), (6, 11))  # (class_start, class_stop) per rank: uneven
EMPTY_SHARDS = ((0, 11), (11, 11))  # rank 1 holds no class
CASES = {  # name -> (shape of the logits, shards, options)
    "2-D": ((7, CLASSES), SHARDS, {}),
    "tempered capped": ((7, CLASSES), SHARDS, {"temperature": 0.7, "softcap": 3.0}),
    "K-dim": ((3, CLASSES, 4), SHARDS, {"temperature": 1.5}),
    "unbatched": ((CLASSES,), SHARDS, {}),
    "rank without classes": ((5, CLASSES), EMPTY_SHARDS, {"ignore_index": 2}),
}
LINEAR_CASES = {  # name -> (rows or None for unbatched, chunk_rows, options)
    "blocks": (9, 4, {"temperature": 0.8}),
    "capped": (9, 16, {"softcap": 2.0}),
    "unbatched": (None, None, {}),
}


def _logits(shape, ignore_index=-100):
    """Logits with a tie across the shards (classes 3 and 8 of row 0: argmax 3), ±1e4 and
    -inf at classes nobody targets, ignored targets."""
    gen = torch.Generator().manual_seed(len(shape) * 10 + shape[0])
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 2
    classes_last = x.movedim(1, -1) if x.dim() > 1 else x
    t = torch.randint(0, 3, classes_last.shape[:-1], generator=gen)  # targets in 0..2
    if x.dim() > 1:
        flat = classes_last.reshape(-1, CLASSES)
        flat[0, 3] = flat[0, 8] = 9.0
        flat[1, 9] = 1e4
        flat[2, 10] = -1e4
        flat[3, 7] = -torch.inf
        t.reshape(-1)[1::3] = ignore_index
        x = flat.reshape(classes_last.shape).movedim(-1, 1)
    upstream = [torch.randn(t.shape, generator=gen, dtype=torch.float64) for _ in range(3)]
    return x.contiguous(), t, upstream


def _hidden(rows):
    gen = torch.Generator().manual_seed(5)
    shape = (rows, 4) if rows is not None else (4,)
    h = torch.randn(shape, generator=gen, dtype=torch.float64)
    w = torch.randn(CLASSES, 4, generator=gen, dtype=torch.float64)
    b = torch.randn(CLASSES, generator=gen, dtype=torch.float64)
    t = torch.randint(0, CLASSES, shape[:-1], generator=gen)
    if rows is not None:
        t[::3] = -100
    upstream = [torch.randn(t.shape, generator=gen, dtype=torch.float64) for _ in range(3)]
    return h, w, b, t, upstream


def _rank_main(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    loopback = next(name for _, name in socket.if_nameindex() if name.startswith("lo"))
    os.environ["GLOO_SOCKET_IFNAME"] = loopback
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
        timeout=datetime.timedelta(seconds=120),
    )  # fmt: skip
    results = {}
    for name, (shape, shards, options) in CASES.items():
        x, t, upstream = _logits(shape, options.get("ignore_index", -100))
        start, stop = shards[rank]
        xr = x.narrow(0 if x.dim() == 1 else 1, start, stop - start).clone().requires_grad_()
        stats = nllloss.distributed.token_stats(xr, t, class_start=start, **options)
        assert isinstance(stats, nllloss.TokenStats)
        torch.autograd.backward(list(stats[:3]), upstream)
        results[name] = [a.detach() for a in (*stats, xr.grad)]
    for name, (rows, chunk_rows, options) in LINEAR_CASES.items():
        h, w, b, t, upstream = _hidden(rows)
        start, stop = SHARDS[rank]
        hr = h.clone().requires_grad_()
        wr = w[start:stop].clone().requires_grad_()
        br = b[start:stop].clone().requires_grad_()
        stats = nllloss.distributed.linear_token_stats(
            hr, wr, t, class_start=start, linear_bias_shard=br, chunk_rows=chunk_rows, **options
        )
        torch.autograd.backward(list(stats[:3]), upstream)
        results["linear " + name] = [a.detach() for a in (*stats, hr.grad, wr.grad, br.grad)]
    # an argument that differs between the ranks: every rank raises, naming it
    try:
        x, t, _ = _logits((4, CLASSES))
        start, stop = SHARDS[rank]
        nllloss.distributed.token_stats(x[:, start:stop], t, class_start=start,
                                        temperature=1.0 + rank)  # fmt: skip
    except ValueError as exc:
        results["disagreement"] = str(exc)
    with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(results, f)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("stats")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.start_processes(
        _rank_main, args=(port, str(out_dir)), nprocs=WORLD, join=True, start_method="spawn"
    )
    results = []
    for rank in range(WORLD):
        with open(out_dir / f"rank{rank}.pkl", "rb") as f:
            results.append(pickle.load(f))
    return results


def _expected(x, t, upstream, options):
    """The unsharded statistics and the gradient of sum(u * stat) by float64 autograd."""
    x = x.clone().requires_grad_()
    options = dict(options)
    ignore_index = options.pop("ignore_index", -100)
    stats = oracle(x, t, options.get("temperature", 1.0), options.get("softcap"), ignore_index)
    (grad,) = torch.autograd.grad(
        sum((s * u).sum() for s, u in zip(stats[:3], upstream, strict=True)), x
    )
    return [s.detach() for s in stats], grad


@pytest.mark.parametrize("name", list(CASES))
def test_token_stats_equal_the_unsharded_composition(ranks, name):
    shape, shards, options = CASES[name]
    x, t, upstream = _logits(shape, options.get("ignore_index", -100))
    stats, grad = _expected(x, t, upstream, options)
    for rank, (start, stop) in enumerate(shards):
        *got, got_grad = ranks[rank][name]
        for what, actual, wanted in zip(("logprob", "entropy", "lse", "argmax"), got, stats,
                                        strict=True):  # fmt: skip
            assert actual.shape == wanted.shape, what
            if what == "argmax":
                assert actual.dtype == torch.int64
                torch.testing.assert_close(actual, wanted, msg=what)
            else:
                torch.testing.assert_close(actual, wanted, rtol=1e-10, atol=1e-10, msg=what)
        wanted_grad = grad.narrow(0 if grad.dim() == 1 else 1, start, stop - start)
        torch.testing.assert_close(got_grad, wanted_grad, rtol=1e-10, atol=1e-12)
    if shape[0] > 1 and len(shape) == 2:
        assert ranks[0][name][3][0] == 3  # the tie across the shards: the first index


@pytest.mark.parametrize("name", list(LINEAR_CASES))
def test_linear_token_stats_equal_the_unsharded_composition(ranks, name):
    rows, _, options = LINEAR_CASES[name]
    h, w, b, t, upstream = _hidden(rows)
    exact = [a.clone().requires_grad_() for a in (h, w, b)]
    logits = exact[0] @ exact[1].T + exact[2]
    stats = oracle(logits, t, options.get("temperature", 1.0), options.get("softcap"))
    grads = torch.autograd.grad(
        sum((s * u).sum() for s, u in zip(stats[:3], upstream, strict=True)), exact
    )
    for rank, (start, stop) in enumerate(SHARDS):
        *got, got_h, got_w, got_b = ranks[rank]["linear " + name]
        for actual, wanted in zip(got, stats, strict=True):
            torch.testing.assert_close(actual, wanted.detach(), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(got_h, grads[0], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(got_w, grads[1][start:stop], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(got_b, grads[2][start:stop], rtol=1e-10, atol=1e-12)


def test_a_disagreement_raises_on_every_rank(ranks):
    for rank in range(WORLD):
        assert "temperature" in ranks[rank]["disagreement"]

"""The class-parallel protocol of nllloss.distributed on 2 gloo ranks: a call that fails on
one rank raises on both, promptly; a rank that catches the error and calls again stays
paired with the other; arguments whose position-weighted sums collide are still told apart.

The 2 ranks (spawned, talking over 127.0.0.1) run every case in turn, each rank timing its
calls; the process group's timeout is short, so that a rank left waiting in a collective
fails the test instead of hanging it. Expected values: torch on the unsharded tensors.
"""

from __future__ import annotations

import datetime
import os
import pickle
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing
import torch.nn.functional as F

import nllloss.distributed

WORLD = 2
# A rank left alone in a collective gives up after this long (gloo's timeout).
COLLECTIVE_TIMEOUT = 20
# Seconds for the whole group: start, every case, exit (about 10 s on 2 busy cores).
GROUP_TIMEOUT = 150
# A call that fails on one rank must end on every rank well within the collective timeout.
PROMPT = 10.0
SHARDS = ((0, 3), (3, 6))  # (class_start, class_stop) of each rank: C = 6


def _hidden(seed: int):
    """Hidden states (5, 4), the whole output layer (6, 4) and a target with one ignored."""
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    w = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    t = torch.tensor([0, 5, 2, -100, 3])
    return h, w, t


def _logits():
    gen = torch.Generator().manual_seed(7)
    return torch.randn(2, 6, generator=gen, dtype=torch.float64)


def _linear_call(rank: int, seed: int, class_start=None, **options):
    h, w, t = _hidden(seed)
    start, stop = SHARDS[rank]
    loss = nllloss.distributed.linear_cross_entropy(
        h, w[start:stop], t, class_start=start if class_start is None else class_start, **options
    )
    return loss.detach()


# ---------------------------------------------------------------------------------------
# The cases: (rank) -> what the rank returns; a raise is recorded as (type, message).


def _linear_bad_on_rank_1(rank):
    h, w, t = _hidden(0)
    start, stop = SHARDS[rank]
    shard = w[start:stop].float() if rank == 1 else w[start:stop]  # not the input's dtype
    return nllloss.distributed.linear_cross_entropy(h, shard, t, class_start=start)


def _retried(first, second):
    """What a training loop that catches the error and calls again gets: the first call's
    outcome, then the second's."""
    try:
        outcome = first()
    except Exception as exc:
        outcome = (type(exc).__name__, str(exc))
    return outcome, second()


def _linear_retry(rank):
    # rank 0: a valid call of one problem; rank 1: an invalid class_start. Then both: another.
    return _retried(
        lambda: _linear_call(rank, 0, class_start=-1) if rank == 1 else _linear_call(rank, 0),
        lambda: _linear_call(rank, 1),
    )


def _nll_retry(rank):
    x, t = _logits(), torch.tensor([1, 4])
    start, stop = SHARDS[rank]

    def call(**options):
        return nllloss.distributed.nll_loss(x[:, start:stop], t, from_logits=True, **options)

    return _retried(
        lambda: call(class_start=start, reduction="avg" if rank == 1 else "mean"),
        lambda: call(class_start=start, reduction="sum"),
    )


def _total_weight_retry(rank):
    t = torch.tensor([0, 2, -100]) if rank == 0 else torch.tensor([1, 1])
    w = torch.tensor([0.5, 2.0, 3.0], dtype=torch.float64)
    return _retried(
        lambda: nllloss.distributed.total_weight(t.double() if rank == 0 else t, w),
        lambda: nllloss.distributed.total_weight(t, w),
    )


# Position-weighted sums sum_i v_i (2i + 1) that collide: equal for both ranks' arguments.
COLLIDING_WEIGHTS = ([1.0, 1.0, 1.0, 1.0, 1.0, 1.0], [4.0, 0.0, 1.0, 1.0, 1.0, 1.0])
COLLIDING_TARGETS = ([0, 2], [3, 1])  # (as t + 1: 1 + 3 * 3 = 4 + 2 * 3)


def _colliding_weights(rank):
    x, t = _logits(), torch.tensor([1, 4])
    start, stop = SHARDS[rank]
    weight = torch.tensor(COLLIDING_WEIGHTS[rank], dtype=torch.float64)
    return nllloss.distributed.nll_loss(
        x[:, start:stop], t, class_start=start, weight=weight, from_logits=True
    )


def _colliding_targets(rank):
    x = _logits()
    start, stop = SHARDS[rank]
    t = torch.tensor(COLLIDING_TARGETS[rank])
    return nllloss.distributed.nll_loss(x[:, start:stop], t, class_start=start, from_logits=True)


def _colliding_linear_weights(rank):
    weight = torch.tensor(COLLIDING_WEIGHTS[rank], dtype=torch.float64)
    return _linear_call(rank, 0, weight=weight)


def _colliding_total_weight(rank):
    weight = torch.tensor(COLLIDING_WEIGHTS[rank], dtype=torch.float64)
    return nllloss.distributed.total_weight(torch.tensor([0, 1]), weight)


def _different_functions(rank):
    if rank == 0:
        return nllloss.distributed.total_weight(torch.tensor([0, 1]))
    x, t = _logits(), torch.tensor([1, 4])
    return nllloss.distributed.nll_loss(x[:, 3:], t, class_start=3)


def _backward_on_rank_0_only(rank):
    """'none' from hidden states: the backward communicates; rank 1 skips it and calls the
    next loss instead. Then both call again."""
    h, w, t = _hidden(0)
    start, stop = SHARDS[rank]
    h.requires_grad_()
    loss = nllloss.distributed.linear_cross_entropy(
        h, w[start:stop], t, class_start=start, reduction="none"
    )
    return _retried(
        (lambda: loss.sum().backward()) if rank == 0 else (lambda: _linear_call(rank, 0)),
        lambda: _linear_call(rank, 1),
    )


# Default blocks of rows: 300 rows, 10 classes on rank 0 and 12000 on rank 1 (float64):
# the rule of rows per block gives 300 rows for the first shard and 174 for the second.
BIG_SHARDS = ((0, 10), (10, 12010))


def _big_problem():
    gen = torch.Generator().manual_seed(3)
    h = torch.randn(300, 3, generator=gen, dtype=torch.float64)
    w = torch.randn(12010, 3, generator=gen, dtype=torch.float64)
    t = torch.randint(0, 12010, (300,), generator=gen)
    return h, w, t


def _default_blocks_uneven_shards(rank):
    h, w, t = _big_problem()
    start, stop = BIG_SHARDS[rank]
    return nllloss.distributed.linear_cross_entropy(h, w[start:stop], t, class_start=start)


CASES = {
    "linear bad argument": _linear_bad_on_rank_1,
    "linear retry": _linear_retry,
    "nll_loss retry": _nll_retry,
    "total_weight retry": _total_weight_retry,
    "colliding weights": _colliding_weights,
    "colliding targets": _colliding_targets,
    "colliding linear weights": _colliding_linear_weights,
    "colliding total_weight weights": _colliding_total_weight,
    "different functions": _different_functions,
    "backward on one rank": _backward_on_rank_0_only,
    "default blocks, uneven shards": _default_blocks_uneven_shards,
}


def _rank_main(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    loopback = next(name for _, name in socket.if_nameindex() if name.startswith("lo"))
    os.environ["GLOO_SOCKET_IFNAME"] = loopback
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
        timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT),
    )  # fmt: skip
    outcomes = {}
    for name, case in CASES.items():
        began = time.monotonic()
        try:
            outcome = case(rank)
        except Exception as exc:
            outcome = (type(exc).__name__, str(exc))
        outcomes[name] = (outcome, time.monotonic() - began)
        with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:  # so far
            pickle.dump(outcomes, f)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """``ranks[rank][case] = (outcome, seconds)``; a case a rank did not reach is missing."""
    out_dir = tmp_path_factory.mktemp("protocol")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = torch.multiprocessing.start_processes(
        _rank_main, args=(port, str(out_dir)), nprocs=WORLD, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + GROUP_TIMEOUT
    try:
        while time.monotonic() < deadline:
            try:
                if context.join(timeout=max(0.0, deadline - time.monotonic())):
                    break
            except Exception:  # a rank died (e.g. gloo's timeout): what it saved is read below
                break
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    results = []
    for rank in range(WORLD):
        path = out_dir / f"rank{rank}.pkl"
        results.append(pickle.loads(path.read_bytes()) if path.exists() else {})
    return results


def _outcomes(ranks, name):
    """Each rank's outcome of the case ``name``, after checking that it ended promptly."""
    for rank, outcomes in enumerate(ranks):
        if name not in outcomes:
            pytest.fail(f"rank {rank} did not finish the case (a collective left waiting?)")
        seconds = outcomes[name][1]
        assert seconds < PROMPT, f"rank {rank} took {seconds:.1f} s"
    return [outcomes[name][0] for outcomes in ranks]


def _raised_alike(outcomes, failing_rank, kind):
    """The failing rank raised ``kind``; the other the same type, naming that rank."""
    raised = outcomes[failing_rank]
    assert isinstance(raised, tuple), raised
    assert raised[0] == kind, raised
    for rank, other in enumerate(outcomes):
        if rank != failing_rank:
            assert other == (kind, f"on rank {failing_rank} of the group: {kind}: {raised[1]}")


def _linear_oracle(seed: int, **options):
    h, w, t = _hidden(seed)
    return F.linear_cross_entropy(h, w, t, **options)


def test_a_bad_linear_argument_on_one_rank_raises_on_both_promptly(ranks):
    outcomes = _outcomes(ranks, "linear bad argument")
    _raised_alike(outcomes, 1, "TypeError")
    assert "linear_weight must have the input's dtype" in outcomes[1][1]


def test_a_rank_that_catches_and_calls_again_stays_paired(ranks):
    outcomes = _outcomes(ranks, "linear retry")
    _raised_alike([first for first, _ in outcomes], 1, "ValueError")
    expected = _linear_oracle(1)
    for _, second in outcomes:
        torch.testing.assert_close(second, expected, rtol=1e-12, atol=0)

    outcomes = _outcomes(ranks, "nll_loss retry")
    _raised_alike([first for first, _ in outcomes], 1, "ValueError")
    expected = F.cross_entropy(_logits(), torch.tensor([1, 4]), reduction="sum")
    for _, second in outcomes:
        torch.testing.assert_close(second, expected, rtol=1e-12, atol=0)

    outcomes = _outcomes(ranks, "total_weight retry")
    _raised_alike([first for first, _ in outcomes], 0, "TypeError")
    for _, second in outcomes:  # 0.5 + 3.0 on rank 0, 2.0 + 2.0 on rank 1
        assert second.dtype == torch.float64
        assert second.item() == 7.5


@pytest.mark.parametrize(
    ("case", "name"),
    [
        ("colliding weights", "weight"),
        ("colliding targets", "target"),
        ("colliding linear weights", "weight"),
        ("colliding total_weight weights", "weight"),
    ],
)
def test_arguments_whose_checksums_collide_are_told_apart(ranks, case, name):
    outcomes = _outcomes(ranks, case)
    assert outcomes[0] == outcomes[1]
    kind, message = outcomes[0]
    assert kind == "ValueError"
    assert message.startswith(f"{name} must be the same on every rank of the group")


def test_ranks_in_different_functions_raise_on_both(ranks):
    outcomes = _outcomes(ranks, "different functions")
    assert outcomes[0] == outcomes[1]
    kind, message = outcomes[0]
    assert kind == "RuntimeError"
    assert "rank 0 called total_weight and rank 1 nll_loss" in message


def test_a_backward_on_one_rank_only_raises_there_and_in_the_others_next_call(ranks):
    outcomes = _outcomes(ranks, "backward on one rank")
    (first_0, second_0), (first_1, second_1) = outcomes
    assert first_0 == first_1
    assert first_0[0] == "RuntimeError"
    assert "rank 0 called the backward of linear_cross_entropy and rank 1 " in first_0[1]
    expected = _linear_oracle(1)
    for second in (second_0, second_1):  # in step again
        torch.testing.assert_close(second, expected, rtol=1e-12, atol=0)


def test_default_blocks_of_rows_are_the_same_on_every_rank(ranks):
    outcomes = _outcomes(ranks, "default blocks, uneven shards")
    h, w, t = _big_problem()
    expected = F.linear_cross_entropy(h, w, t)
    for outcome in outcomes:
        assert not isinstance(outcome, tuple), outcome
        torch.testing.assert_close(outcome, expected, rtol=1e-12, atol=0)


# ---------------------------------------------------------------------------------------
# What needs no other rank: one process, a group of one.


@pytest.fixture
def one_rank():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


X = torch.tensor([[-1.0, 2.0, -0.5], [0.3, -1.5, 2.5]], dtype=torch.float64)


@pytest.mark.parametrize("softcap", [None, 2.0])
def test_second_order_gradients_are_refused_clearly(one_rank, softcap):
    x = X.clone().requires_grad_()
    loss = nllloss.distributed.nll_loss(
        x, torch.tensor([0, 2]), class_start=0, from_logits=True, softcap=softcap
    )
    with pytest.raises(RuntimeError, match="second-order gradients"):
        torch.autograd.grad(loss, x, create_graph=True)
    (grad,) = torch.autograd.grad(loss, x)  # first order still works
    reference = X.clone().requires_grad_()
    logits = reference if softcap is None else softcap * torch.tanh(reference / softcap)
    F.cross_entropy(logits, torch.tensor([0, 2])).backward()
    torch.testing.assert_close(grad, reference.grad, rtol=1e-12, atol=0)


def test_second_order_gradients_of_the_linear_loss_are_refused_clearly(one_rank):
    h, w, t = _hidden(0)
    h.requires_grad_()
    loss = nllloss.distributed.linear_cross_entropy(h, w, t, class_start=0)
    with pytest.raises(RuntimeError, match="second-order gradients"):
        torch.autograd.grad(loss, h, create_graph=True)


def test_a_probability_target_changed_in_place_before_backward_is_detected(one_rank):
    x = X.clone().requires_grad_()
    p = torch.softmax(X * 0.5, dim=1)
    loss = nllloss.distributed.nll_loss(x, p, class_start=0, from_logits=True)
    with torch.no_grad():
        p.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("name", ["input", "linear_weight_shard"])
def test_linear_arguments_changed_in_place_before_backward_are_detected(one_rank, name):
    h, w, t = _hidden(0)
    h.requires_grad_()
    w.requires_grad_()
    loss = nllloss.distributed.linear_cross_entropy(h, w, t, class_start=0, reduction="none")
    with torch.no_grad():
        (h if name == "input" else w).mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.sum().backward()


def test_probability_mean_without_classes_is_nan_as_torch(one_rank):
    x = torch.zeros((3, 0), dtype=torch.float64, requires_grad=True)
    p = torch.zeros((3, 0), dtype=torch.float64)
    loss = nllloss.distributed.nll_loss(x, p, class_start=0, from_logits=True)
    expected = F.cross_entropy(torch.zeros((3, 0), dtype=torch.float64), p)
    assert torch.isnan(expected)
    assert torch.isnan(loss)

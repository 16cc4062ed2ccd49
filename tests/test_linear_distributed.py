"""nllloss.distributed.linear_cross_entropy on 2 gloo ranks (CPU) against torch's
``F.linear_cross_entropy`` of the whole weight, in float64."""

from __future__ import annotations

import datetime
import os
import pickle
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing
import torch.nn.functional as F

import nllloss.distributed

WORLD = 2
SHARDS = ((0, 6), (6, 11))  # (class_start, class_stop) per rank: uneven
CASES = {  # name -> options
    "mean": {"reduction": "mean"},
    "sum smoothed": {"reduction": "sum", "label_smoothing": 0.1},
    "none weighted": {"reduction": "none", "weight": torch.linspace(0.5, 2.0, 11).double()},
    "mean ignore None": {"reduction": "mean", "ignore_index": None},
}


def _tensors():
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(9, 5, generator=gen, dtype=torch.float64)
    w = torch.randn(11, 5, generator=gen, dtype=torch.float64)
    b = torch.randn(11, generator=gen, dtype=torch.float64)
    t = torch.randint(0, 11, (9,), generator=gen)
    t[[2, 5]] = -100
    g = torch.linspace(-1.0, 2.0, 9, dtype=torch.float64)
    return h, w, b, t, g


def _upstream(options, g):
    return g if options["reduction"] == "none" else torch.tensor(1.5, dtype=torch.float64)


def _rank_main(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    loopback = next(name for _, name in socket.if_nameindex() if name.startswith("lo"))
    os.environ["GLOO_SOCKET_IFNAME"] = loopback
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
        timeout=datetime.timedelta(seconds=120),
    )  # fmt: skip
    h, w, b, t, g = _tensors()
    start, stop = SHARDS[rank]
    results = {}
    for name, options in CASES.items():
        hr = h.clone().requires_grad_()
        wr = w[start:stop].clone().requires_grad_()
        br = b[start:stop].clone().requires_grad_()
        loss = nllloss.distributed.linear_cross_entropy(
            hr, wr, t, class_start=start, linear_bias_shard=br, chunk_rows=4, **options
        )
        loss.backward(_upstream(options, g))
        results[name] = [a.detach() for a in (loss, hr.grad, wr.grad, br.grad)]
    with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(results, f)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("linear")
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


@pytest.mark.parametrize("name", list(CASES))
def test_vocabulary_parallel_equals_torch_with_the_whole_weight(ranks, name):
    options = dict(CASES[name])
    h, w, b, t, g = (a.clone() for a in _tensors())
    for a in (h, w, b):
        a.requires_grad_()
    if options.get("ignore_index", -100) is None:
        options.pop("ignore_index")
    loss = F.linear_cross_entropy(h, w, t, linear_bias=b, **options)
    loss.backward(_upstream(options, g))
    for rank, (start, stop) in enumerate(SHARDS):
        got_loss, got_h, got_w, got_b = ranks[rank][name]
        torch.testing.assert_close(got_loss, loss.detach())
        torch.testing.assert_close(got_h, h.grad)
        torch.testing.assert_close(got_w, w.grad[start:stop])
        torch.testing.assert_close(got_b, b.grad[start:stop])

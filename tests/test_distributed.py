"""nllloss.distributed across processes: 2 and 4 gloo ranks on the CPU, against torch.

Each world size is one group of processes (spawned with torch.multiprocessing, talking over
127.0.0.1) that runs every case in turn, the error cases first: the valid cases after them
also show that a failed call leaves the ranks in step. The ranks send back their losses and
gradients; the tests compare them here with torch on the unsharded tensors
(``F.nll_loss``, ``F.cross_entropy``, or torch's label-smoothing formula written out; the
z-loss and the cap in float64 with ``torch.logsumexp`` and ``torch.tanh``).
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import pathlib
import pickle
import re
import socket
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing
import torch.nn.functional as F

import nllloss
import nllloss.distributed

WORLD_SIZES = (2, 4)
# Seconds for a whole group: start, every case, exit (about 10 s on 2 busy cores).
GROUP_TIMEOUT = 240
GUIDE = pathlib.Path(__file__).parents[1] / "docs" / "guide" / "training-at-scale.md"


# ---------------------------------------------------------------------------------------
# The problems: built alike in the ranks and here, from their name.


@dataclasses.dataclass(frozen=True)
class ClassParallel:
    """A class-parallel call: rank r passes its slice of the class axis of one input."""

    name: str
    shape: tuple[int, ...] = (6, 7)  # the unsharded input; (C,) is unbatched
    dtype: torch.dtype = torch.float64
    reduction: str = "mean"
    from_logits: bool = False
    label_smoothing: float = 0.0
    weighted: bool = False
    ignore_index: int = -100
    ignored: float = 0.3  # share of target elements set to ignore_index
    total_weight: float | None = None
    sizes: dict[int, tuple[int, ...]] | None = None  # world -> C_r per rank, in class order
    reverse: bool = False  # rank 0 holds the last classes
    classes_used: int | None = None  # targets only below this class: some ranks own none
    bitwise: bool = False  # element-wise values and gradients equal torch's bit for bit
    probabilities: bool = False  # the target holds class probabilities (sharded as x)
    z_loss: float = 0.0
    softcap: float | None = None

    @property
    def classes(self) -> int:
        return self.shape[0] if len(self.shape) == 1 else self.shape[1]

    @property
    def class_axis(self) -> int:
        return 0 if len(self.shape) == 1 else 1

    def tensors(self):
        """The unsharded input, the target, the weight (or None) and the upstream gradient."""
        gen = torch.Generator().manual_seed(zlib.crc32(self.name.encode()))
        x = torch.randn(self.shape, generator=gen, dtype=torch.float64) * 2
        if not self.from_logits:
            x = x.log_softmax(self.class_axis)
        target_shape = () if len(self.shape) == 1 else (self.shape[0], *self.shape[2:])
        high = self.classes_used or self.classes
        t = torch.randint(0, high, target_shape, generator=gen)
        t[torch.rand(target_shape, generator=gen) < self.ignored] = self.ignore_index
        if self.probabilities:  # some near 0, not normalised on purpose in one row
            t = torch.rand(self.shape, generator=gen, dtype=torch.float64) ** 3
            t = (t / t.sum(self.class_axis, keepdim=True)).to(self.dtype)
            if t.dim() > 1 and len(t):
                t[0] *= 1.5
        w = torch.rand(self.classes, generator=gen, dtype=torch.float64) + 0.5
        loss_shape = target_shape if self.reduction == "none" else ()
        upstream = torch.rand(loss_shape, generator=gen, dtype=torch.float64) + 0.5
        x, w, upstream = (a.to(self.dtype) for a in (x, w, upstream))
        return x, t, (w if self.weighted else None), upstream

    def shards(self, world: int) -> list[tuple[int, int]]:
        """(class_start, C_r) of each rank."""
        sizes = (self.sizes or {}).get(world) or _uneven(self.classes, world)
        starts = np.cumsum((0, *sizes[:-1])).tolist()
        shards = list(zip(starts, sizes, strict=True))
        return shards[::-1] if self.reverse else shards

    def options(self) -> dict:
        return dict(
            reduction=self.reduction,
            ignore_index=self.ignore_index,
            from_logits=self.from_logits,
            label_smoothing=self.label_smoothing,
            total_weight=self.total_weight,
            z_loss=self.z_loss,
            softcap=self.softcap,
        )

    def run(self, rank: int, world: int, groups) -> dict:
        x, t, w, upstream = self.tensors()
        start, size = self.shards(world)[rank]
        shard = x.narrow(self.class_axis, start, size).clone().requires_grad_()
        if self.probabilities:  # each rank holds its classes of them
            t = t.narrow(self.class_axis, start, size)
        loss = nllloss.distributed.nll_loss(shard, t, class_start=start, weight=w, **self.options())
        loss.backward(upstream)
        return {"loss": loss.detach(), "grad": shard.grad, "start": start}


def _uneven(classes: int, world: int) -> tuple[int, ...]:
    """1, 2, 3, 1, 2, ... classes, the last rank the rest: world 2 -> (1, 6), 4 -> (1, 2, 3, 1)."""
    sizes = [rank % 3 + 1 for rank in range(world - 1)]
    return (*sizes, classes - sum(sizes))


CLASS_PARALLEL = [
    ClassParallel("log-probs mean", bitwise=True),
    ClassParallel("log-probs weighted mean", weighted=True),
    ClassParallel("log-probs weighted sum", weighted=True, reduction="sum", bitwise=True),
    ClassParallel("log-probs weighted none", weighted=True, reduction="none", bitwise=True),
    ClassParallel("log-probs float32 weighted none", dtype=torch.float32, weighted=True,
                  reduction="none", bitwise=True),
    ClassParallel("log-probs float32 mean", dtype=torch.float32, weighted=True),
    ClassParallel("ignore_index a class", ignore_index=2, ignored=0.4),
    ClassParallel("reversed shards", weighted=True, reverse=True, from_logits=True),
    ClassParallel("an empty shard", sizes={2: (0, 7), 4: (3, 0, 2, 2)}, weighted=True,
                  from_logits=True, label_smoothing=0.1),
    ClassParallel("targets on the first ranks only", classes_used=1, weighted=True,
                  from_logits=True, label_smoothing=0.3),
    ClassParallel("K-dim", shape=(3, 7, 4, 2), weighted=True, label_smoothing=0.2),
    ClassParallel("K-dim from logits", shape=(3, 7, 4, 2), from_logits=True,
                  reduction="none", weighted=True, label_smoothing=0.1),
    ClassParallel("unbatched", shape=(7,), ignored=0.0, from_logits=True),
    ClassParallel("unbatched none", shape=(7,), ignored=0.0, reduction="none",
                  weighted=True, label_smoothing=0.2),
    ClassParallel("log-probs smoothing none", label_smoothing=0.25, reduction="none"),
    ClassParallel("log-probs smoothing weighted sum", label_smoothing=0.1, weighted=True,
                  reduction="sum"),
    ClassParallel("logits mean", from_logits=True),
    ClassParallel("logits weighted mean", from_logits=True, weighted=True),
    ClassParallel("logits weighted none", from_logits=True, weighted=True, reduction="none"),
    ClassParallel("logits smoothing weighted mean", from_logits=True, weighted=True,
                  label_smoothing=0.2),
    ClassParallel("logits smoothing sum", from_logits=True, label_smoothing=0.15,
                  reduction="sum"),
    ClassParallel("logits full smoothing", from_logits=True, label_smoothing=1.0,
                  weighted=True),
    ClassParallel("logits float32 smoothing", from_logits=True, dtype=torch.float32,
                  weighted=True, label_smoothing=0.1),
    ClassParallel("logits bfloat16", from_logits=True, dtype=torch.bfloat16, weighted=True,
                  label_smoothing=0.1),
    ClassParallel("logits total_weight", from_logits=True, weighted=True,
                  label_smoothing=0.1, total_weight=7.25),
    ClassParallel("log-probs total_weight", total_weight=3.0),
    ClassParallel("all ignored", ignored=1.0, weighted=True, from_logits=True,
                  label_smoothing=0.1),
    ClassParallel("empty batch", shape=(0, 7), from_logits=True, reduction="sum"),
    ClassParallel("wide", shape=(5, 50), from_logits=True, weighted=True,
                  label_smoothing=0.1, sizes={2: (13, 37), 4: (1, 20, 17, 12)}),
    ClassParallel("probabilities from logits", probabilities=True, from_logits=True),
    ClassParallel("probabilities weighted smoothing", probabilities=True, from_logits=True,
                  weighted=True, label_smoothing=0.2),
    ClassParallel("probabilities none, an empty shard", probabilities=True, from_logits=True,
                  reduction="none", weighted=True, sizes={2: (0, 7), 4: (3, 0, 2, 2)}),
    ClassParallel("probabilities K-dim sum", shape=(3, 7, 4, 2), probabilities=True,
                  from_logits=True, reduction="sum", weighted=True, label_smoothing=0.1),
    ClassParallel("probabilities unbatched", shape=(7,), probabilities=True, from_logits=True),
    ClassParallel("probabilities float32", probabilities=True, from_logits=True,
                  dtype=torch.float32, weighted=True),
    ClassParallel("probabilities log-probs", probabilities=True, weighted=True,
                  label_smoothing=0.1),
    ClassParallel("probabilities log-probs none", probabilities=True, reduction="none"),
    ClassParallel("probabilities total_weight", probabilities=True, from_logits=True,
                  total_weight=4.5, z_loss=0.01, softcap=3.0),
    ClassParallel("z_loss weighted mean", from_logits=True, weighted=True, z_loss=0.05),
    ClassParallel("z_loss none, ignore_index a class", from_logits=True, z_loss=0.1,
                  reduction="none", ignore_index=2, ignored=0.4, weighted=True),
    ClassParallel("softcap smoothing", from_logits=True, softcap=2.0, label_smoothing=0.1,
                  weighted=True),
    ClassParallel("softcap and z_loss K-dim", shape=(3, 7, 4, 2), from_logits=True,
                  softcap=1.5, z_loss=0.02, weighted=True, reduction="sum"),
    ClassParallel("softcap z_loss probabilities none", probabilities=True, from_logits=True,
                  softcap=2.5, z_loss=0.03, reduction="none", label_smoothing=0.1,
                  sizes={2: (13, 37), 4: (1, 20, 17, 12)}, shape=(5, 50)),
    ClassParallel("z_loss float32 all ignored", from_logits=True, z_loss=0.1, ignored=1.0,
                  dtype=torch.float32),
]  # fmt: skip


@dataclasses.dataclass(frozen=True)
class DataParallel:
    """A batch split over the ranks (and micro-batches within each): each piece's 'mean' loss
    divided by the global total weight from ``distributed.total_weight``.

    With ``class_parallel``, 4 ranks form a 2 x 2 grid: ranks {0, 1} and {2, 3} each share a
    batch piece and shard its classes; ranks {0, 2} and {1, 3} share a class shard.
    """

    name: str
    rows: dict[int, tuple[int, ...]]  # world -> rows of each rank
    micro_batch: int = 2  # rows per micro-batch within a rank
    all_ignored_rank: int = 1
    from_logits: bool = False
    label_smoothing: float = 0.0
    weighted: bool = True
    class_parallel: bool = False

    def problem(self, world: int) -> ClassParallel:
        shape = (sum(self.rows[world]), 5, 2)
        return ClassParallel(
            self.name, shape=shape, weighted=self.weighted, from_logits=self.from_logits,
            label_smoothing=self.label_smoothing, ignored=0.2,
        )  # fmt: skip

    def tensors(self, world: int):
        x, t, w, _ = self.problem(world).tensors()
        a, b = self.row_range(world, self.all_ignored_rank)
        t[a:b] = -100
        return x, t, w

    def row_range(self, world: int, piece: int) -> tuple[int, int]:
        rows = self.rows[world]
        return sum(rows[:piece]), sum(rows[: piece + 1])

    def run(self, rank: int, world: int, groups) -> dict:
        x, t, w = self.tensors(world)
        options = {"from_logits": self.from_logits, "label_smoothing": self.label_smoothing}
        if self.class_parallel:  # batch piece rank // 2, class shard rank % 2
            a, b = self.row_range(world, rank // 2)
            classes = (0, 2) if rank % 2 == 0 else (2, 5)
            shard = x[a:b, classes[0] : classes[1]].clone().requires_grad_()
            total = nllloss.distributed.total_weight(t[a:b], w, group=groups["data"])
            loss = nllloss.distributed.nll_loss(
                shard, t[a:b], class_start=classes[0], group=groups["classes"], weight=w,
                total_weight=total, **options,
            )  # fmt: skip
            loss.backward()
            summed = loss.detach().clone()
            dist.all_reduce(summed, group=groups["data"])
            return {"sum": summed, "grad": shard.grad, "rows": (a, b), "classes": classes}
        a, b = self.row_range(world, rank)
        total = nllloss.distributed.total_weight(t[a:b], w)
        summed, grads = torch.zeros((), dtype=x.dtype), []
        for lo in range(a, b, self.micro_batch):  # gradient accumulation
            hi = min(lo + self.micro_batch, b)
            piece = x[lo:hi].clone().requires_grad_()
            loss = nllloss.nll_loss(piece, t[lo:hi], w, total_weight=total, **options)
            loss.backward()
            summed += loss.detach()
            grads.append(piece.grad)
        dist.all_reduce(summed)
        grad = torch.cat(grads) if grads else x[a:b] * 0
        return {"sum": summed, "grad": grad, "rows": (a, b), "classes": (0, x.shape[1])}


DATA_PARALLEL = [
    DataParallel("pieces, weighted", rows={2: (5, 3), 4: (4, 3, 0, 5)}),
    DataParallel("pieces from logits, smoothing", rows={2: (2, 7), 4: (3, 3, 1, 4)},
                 from_logits=True, label_smoothing=0.1, all_ignored_rank=0),
    DataParallel("pieces unweighted", rows={2: (6, 2), 4: (2, 5, 3, 1)}, weighted=False,
                 micro_batch=3),
    DataParallel("2 x 2 grid", rows={4: (4, 5)}, class_parallel=True, from_logits=True,
                 label_smoothing=0.1),
]  # fmt: skip


# ---------------------------------------------------------------------------------------
# Bad calls. Each returns what a rank passes; every rank must raise.

BAD = ClassParallel("bad calls", ignored=0.0, weighted=True)


def _good_args(rank, world):
    """A valid call: this rank's shard and class_start, the target, the weight."""
    x, t, w, _ = BAD.tensors()
    start, size = BAD.shards(world)[rank]
    return x.narrow(1, start, size), t, {"class_start": start, "weight": w}


def _bad_target_args(rank, world):
    shard, t, kwargs = _good_args(rank, world)
    t[3] = 7  # C: one past the last class
    return (shard, t), kwargs


def _weight_slice_args(rank, world):
    shard, t, kwargs = _good_args(rank, world)
    start = kwargs["class_start"]
    return (shard, t), {**kwargs, "weight": kwargs["weight"][start : start + shard.shape[1]]}


def _one_long_weight_args(rank, world):
    shard, t, kwargs = _good_args(rank, world)
    return (shard, t), {**kwargs, "weight": torch.ones(8 if rank == 1 else 7, dtype=shard.dtype)}


def _overlap_args(rank, world):
    x, t, _, _ = BAD.tensors()
    return (x[:, :2], t), {"class_start": 0}


def _other_target_args(rank, world):
    shard, t, kwargs = _good_args(rank, world)
    t[3] = (t[3] + 1) % 7 if rank == world - 1 else t[3]
    return (shard, t), kwargs


def _integer_input_args(rank, world):
    shard, t, kwargs = _good_args(rank, world)
    return (shard.long() if rank == 0 else shard, t), kwargs


def _other_dtype_args(rank, world):
    shard, t, kwargs = _good_args(rank, world)
    return (shard.float() if rank == world - 1 else shard, t), kwargs


def _other_reduction_args(rank, world):
    shard, t, kwargs = _good_args(rank, world)
    return (shard, t), {**kwargs, "reduction": "sum" if rank == 0 else "mean"}


def _last_rank_passes(common=None, **different):
    """Valid arguments (with ``common`` ones), but the last rank passes ``different`` ones."""

    def args(rank, world):
        shard, t, kwargs = _good_args(rank, world)
        return (shard, t), {**kwargs, **(common or {}), **(different if rank == world - 1 else {})}

    return args


def _probabilities_on_one_rank_args(rank, world):
    shard, t, kwargs = _good_args(rank, world)
    if rank == world - 1:  # its classes of one-hot probabilities
        start = kwargs["class_start"]
        t = F.one_hot(t, 7)[:, start : start + shard.shape[1]].to(shard.dtype)
    return (shard, t), kwargs


def _other_weight_args(rank, world):
    shard, t, kwargs = _good_args(rank, world)
    weight = kwargs["weight"].clone()
    weight[2] += rank == world - 1
    return (shard, t), {**kwargs, "weight": weight}


def _other_total_weight_args(rank, world):
    shard, t, kwargs = _good_args(rank, world)
    return (shard, t), {**kwargs, "total_weight": 5.0 if rank == world - 1 else 4.0}


BAD_CALLS = {
    "target out of range": _bad_target_args,
    "weight sliced": _weight_slice_args,
    "weight too long on rank 1": _one_long_weight_args,
    "overlapping shards": _overlap_args,
    "targets differ": _other_target_args,
    "integer input on rank 0": _integer_input_args,
    "reduction differs": _other_reduction_args,
    "dtypes differ": _other_dtype_args,
    "weights differ": _other_weight_args,
    "weight on one rank only": _last_rank_passes(weight=None),
    "ignore_index differs": _last_rank_passes(ignore_index=3),
    "from_logits differs": _last_rank_passes(from_logits=True),
    "label_smoothing differs": _last_rank_passes(label_smoothing=0.1),
    "total_weight on one rank only": _last_rank_passes(total_weight=4.0),
    "total_weight differs": _other_total_weight_args,
    "z_loss differs": _last_rank_passes({"from_logits": True}, z_loss=0.01),
    "softcap differs": _last_rank_passes({"from_logits": True}, softcap=5.0),
    "probabilities on one rank only": _probabilities_on_one_rank_args,
}


def _bad_total_weight(rank, world):
    """A target (of a float dtype on the last rank) and a weight."""
    t = torch.tensor([0, 1, -100])
    return t.double() if rank == world - 1 else t, torch.ones(3, dtype=torch.float32)


# ---------------------------------------------------------------------------------------
# The ranks.


def _rank_main(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)  # the ranks share the machine's cores
    # Loopback only: gloo would otherwise use the interface of the host's name.
    loopback = next(name for _, name in socket.if_nameindex() if name.startswith("lo"))
    os.environ["GLOO_SOCKET_IFNAME"] = loopback
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=GROUP_TIMEOUT),
    )
    groups = {}
    if world == 4:  # every rank creates every group, in the same order
        data = [dist.new_group([0, 2]), dist.new_group([1, 3])]
        classes = [dist.new_group([0, 1]), dist.new_group([2, 3])]
        groups = {"data": data[rank % 2], "classes": classes[rank // 2]}
    outcomes = {}

    def attempt(key, function, *args, **kwargs):
        try:
            outcomes[key] = function(*args, **kwargs)
        except Exception as exc:
            outcomes[key] = (type(exc).__name__, str(exc))

    for name, make in BAD_CALLS.items():
        args, kwargs = make(rank, world)
        attempt(name, nllloss.distributed.nll_loss, *args, **kwargs)
    attempt("total_weight", nllloss.distributed.total_weight, *_bad_total_weight(rank, world))
    for case in CLASS_PARALLEL + DATA_PARALLEL:
        if case not in DATA_PARALLEL or world in case.rows:
            attempt(case.name, case.run, rank, world, groups)
    attempt("documented", _documented_train_step, rank, world)
    with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(outcomes, f)
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_group(world: int, out_dir) -> list[dict]:
    """Spawn ``world`` ranks that run every case; one dict of outcomes per rank."""
    context = torch.multiprocessing.start_processes(
        _rank_main,
        args=(world, _free_port(), str(out_dir)),
        nprocs=world,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + GROUP_TIMEOUT
    try:
        while not context.join(timeout=max(0.0, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the {world} ranks did not finish within {GROUP_TIMEOUT} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    outcomes = []
    for rank in range(world):
        with open(out_dir / f"rank{rank}.pkl", "rb") as f:
            outcomes.append(pickle.load(f))
    return outcomes


@pytest.fixture(scope="module")
def group(tmp_path_factory):
    """``group(world)[rank][case name]``: each world size's group is run once, when first asked."""
    runs = {}

    def outcomes(world: int) -> list[dict]:
        if world not in runs:
            try:
                runs[world] = _run_group(world, tmp_path_factory.mktemp(f"world{world}"))
            except Exception as exc:  # every test of this world size reports it, once run
                runs[world] = exc
        if isinstance(runs[world], Exception):
            raise runs[world]
        return runs[world]

    return outcomes


def _results(outcomes: list[dict], key: str) -> list:
    """Each rank's result of the case ``key``; fails if a rank raised."""
    for rank, outcome in enumerate(outcomes):
        if isinstance(outcome[key], tuple):
            pytest.fail(f"rank {rank} raised {outcome[key][0]}: {outcome[key][1]}")
    return [outcome[key] for outcome in outcomes]


def _raised(outcomes: list[dict], key: str) -> list[tuple[str, str]]:
    """Each rank's (exception type, message) for the bad call ``key``."""
    return [outcome[key] for outcome in outcomes]


# ---------------------------------------------------------------------------------------
# The oracle: torch on the unsharded tensors, in float64 (or the case's dtype).


def _oracle(case: ClassParallel, x, t, w, upstream):
    """Loss and input gradient of torch on the whole input (16-bit: computed in float32)."""
    compute = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    x = x.to(compute).requires_grad_()
    w = None if w is None else w.to(compute)
    options = dict(weight=w, ignore_index=case.ignore_index)
    reduction = "sum" if case.total_weight is not None else case.reduction
    if case.probabilities:
        t = t.to(compute)
        options.pop("ignore_index")  # torch refuses one with probabilities
    if case.from_logits:
        logits = x if case.softcap is None else case.softcap * torch.tanh(x / case.softcap)
        loss = F.cross_entropy(
            logits, t, **options, reduction=reduction, label_smoothing=case.label_smoothing
        )
        if case.z_loss:
            loss = loss + _z_loss_oracle(case, logits, t, w, reduction)
    elif case.probabilities:  # ours: cross_entropy's formula without its log_softmax
        eps, classes = case.label_smoothing, case.classes
        p = t * (1 - eps) + eps / classes
        if w is not None:
            p = p * w.view((classes,) + (1,) * (x.dim() - 1 - case.class_axis))
        loss = -(x * p).sum(case.class_axis)
        if reduction != "none":
            loss = loss.sum() / (loss.numel() if reduction == "mean" else 1)
    else:
        loss = F.nll_loss(x, t, **options, reduction=reduction)
        if case.label_smoothing:  # torch's formula (cross_entropy) on the log-probabilities
            eps, classes = case.label_smoothing, case.classes
            class_weight = torch.ones(classes, dtype=compute) if w is None else w
            view = (classes,) if x.dim() == 1 else (1, classes) + (1,) * (x.dim() - 2)
            smooth = -(x * class_weight.view(view)).sum(case.class_axis)
            smooth = smooth.masked_fill(t == case.ignore_index, 0)
            if reduction != "none":
                smooth = smooth.sum()
            if reduction == "mean":
                kept = t[t != case.ignore_index]
                smooth = smooth / (class_weight[kept].sum() if w is not None else kept.numel())
            loss = (1 - eps) * loss + smooth * (eps / classes)
    if case.total_weight is not None:
        loss = loss / case.total_weight
    loss.backward(upstream.to(compute))
    return loss.detach().to(case.dtype), x.grad.to(case.dtype)


def _z_loss_oracle(case: ClassParallel, logits, t, w, reduction):
    """``z v lse**2`` (v = w[y], 0 where ignored; 1 for probabilities), reduced as the loss:
    its 'mean' divides by the same denominator, the weight sum or the element count."""
    lse = torch.logsumexp(logits, dim=case.class_axis)
    if case.probabilities:
        v = torch.ones_like(lse)
        z = case.z_loss * lse.square()
    else:  # selected, not multiplied by 0: nothing of an ignored element, even in the gradient
        kept = t != case.ignore_index
        v = kept.to(lse.dtype) if w is None else torch.where(kept, w[t.clamp(min=0)], 0)
        z = torch.where(kept, case.z_loss * v * lse.square(), 0)
    if reduction == "none":
        return z
    if reduction == "sum":
        return z.sum()
    return z.sum() / (lse.numel() if case.probabilities else v.sum())


def _tolerance(dtype):
    return {
        torch.float64: {"rtol": 1e-12, "atol": 1e-14},
        torch.float32: {"rtol": 4e-6, "atol": 1e-7},
        torch.bfloat16: {"rtol": 2**-8, "atol": 1e-5},  # one rounding of the same value
    }[dtype]


def _gathered_grad(case: ClassParallel, results):
    """The ranks' gradient shards, put back in class order."""
    ordered = sorted(results, key=lambda r: r["start"])
    return torch.cat([r["grad"] for r in ordered], dim=case.class_axis)


# ---------------------------------------------------------------------------------------
# The tests.


@pytest.fixture
def numpy_engine():
    """Overrides conftest's two-engine fixture: torch tensors only here, one run suffices."""
    return "default"


@pytest.mark.parametrize("world", WORLD_SIZES, ids=lambda w: f"{w} ranks")
@pytest.mark.parametrize("case", CLASS_PARALLEL, ids=lambda c: c.name)
def test_class_parallel_loss_and_gradient_equal_torch_unsharded(group, world, case):
    results = _results(group(world), case.name)
    x, t, w, upstream = case.tensors()
    expected_loss, expected_grad = _oracle(case, x, t, w, upstream)
    loss, grad = results[0]["loss"], _gathered_grad(case, results)
    for result in results:  # one value, bit for bit, on every rank
        torch.testing.assert_close(result["loss"], loss, rtol=0, atol=0, equal_nan=True)
    assert grad.dtype == loss.dtype == case.dtype
    assert loss.shape == expected_loss.shape
    torch.testing.assert_close(loss, expected_loss, equal_nan=True, **_tolerance(case.dtype))
    torch.testing.assert_close(grad, expected_grad, **_tolerance(case.dtype))
    if case.bitwise:  # x[n, y] crosses the network unchanged: torch's elementwise bits
        assert torch.equal(grad, expected_grad)
        if case.reduction == "none":
            assert torch.equal(loss, expected_loss)


def test_class_parallel_cases_cover_what_they_claim():
    """The shapes of the cases: uneven shards, C_r = 1, C_r = 0, ranks without targets."""
    cases = {case.name: case for case in CLASS_PARALLEL}
    _, t, _, _ = cases["targets on the first ranks only"].tensors()
    for world in WORLD_SIZES:
        sizes = {name: [s for _, s in case.shards(world)] for name, case in cases.items()}
        assert len(set(sizes["log-probs mean"])) > 1
        assert 1 in sizes["log-probs mean"]
        assert 0 in sizes["an empty shard"]
        shards = cases["targets on the first ranks only"].shards(world)
        assert any(not ((start <= t) & (t < start + size)).any() for start, size in shards if size)


@pytest.mark.parametrize(
    ("world", "case"),
    [(world, case) for case in DATA_PARALLEL for world in case.rows],
    ids=lambda p: f"{p} ranks" if isinstance(p, int) else p.name,
)
def test_pieces_with_the_global_total_weight_add_up_to_the_whole_batch(group, world, case):
    results = _results(group(world), case.name)
    x, t, w = case.tensors(world)
    whole = ClassParallel(
        case.name, shape=x.shape, weighted=case.weighted, from_logits=case.from_logits,
        label_smoothing=case.label_smoothing,
    )  # fmt: skip
    expected_loss, expected_grad = _oracle(whole, x, t, w, torch.ones((), dtype=x.dtype))
    grad = torch.zeros_like(expected_grad)
    for result in results:
        torch.testing.assert_close(result["sum"], expected_loss, **_tolerance(x.dtype))
        (a, b), (lo, hi) = result["rows"], result["classes"]
        grad[a:b, lo:hi] = result["grad"]
    torch.testing.assert_close(grad, expected_grad, **_tolerance(x.dtype))
    # The pieces are uneven enough that their own means would not do.
    naive = [
        F.cross_entropy(x[a:b], t[a:b], weight=w, label_smoothing=case.label_smoothing)
        if case.from_logits
        else F.nll_loss(x[a:b], t[a:b], weight=w)
        for a, b in {r["rows"] for r in results}
    ]
    naive_mean = torch.stack(naive).nan_to_num(0).mean()
    assert not torch.allclose(naive_mean, expected_loss, rtol=1e-3)


def _core_error(call):
    """(type, message) of the error that nllloss raises for the unsharded call."""
    try:
        call()
    except (ValueError, TypeError, IndexError) as exc:
        return type(exc).__name__, str(exc)
    pytest.fail("the unsharded call raised nothing")


@pytest.mark.parametrize("world", WORLD_SIZES, ids=lambda w: f"{w} ranks")
def test_out_of_range_target_raises_the_core_index_error_on_every_rank(group, world):
    raised = _raised(group(world), "target out of range")
    x, t, w, _ = BAD.tensors()
    t[3] = 7
    expected = _core_error(lambda: nllloss.nll_loss(x, t, w))
    assert expected[0] == "IndexError"
    assert "target[3] = 7" in expected[1]
    assert raised == [expected] * world


@pytest.mark.parametrize("world", WORLD_SIZES, ids=lambda w: f"{w} ranks")
def test_a_weight_of_the_wrong_length_raises_the_core_error_on_every_rank(group, world):
    raised = _raised(group(world), "weight sliced")
    x, t, w, _ = BAD.tensors()
    for rank, (start, size) in enumerate(BAD.shards(world)):
        sliced = w[start : start + size]
        assert raised[rank] == _core_error(lambda: nllloss.nll_loss(x, t, sliced))  # noqa: B023


@pytest.mark.parametrize("world", WORLD_SIZES, ids=lambda w: f"{w} ranks")
def test_a_check_failing_on_one_rank_raises_on_every_rank(group, world):
    raised = _raised(group(world), "weight too long on rank 1")
    x, t, _, _ = BAD.tensors()
    kind, message = _core_error(lambda: nllloss.nll_loss(x, t, torch.ones(8, dtype=x.dtype)))
    assert raised[1] == (kind, message)
    others = (kind, f"on rank 1 of the group: {kind}: {message}")
    assert [r for rank, r in enumerate(raised) if rank != 1] == [others] * (world - 1)

    raised = _raised(group(world), "integer input on rank 0")
    kind, message = _core_error(lambda: nllloss.nll_loss(x.long(), t))
    assert kind == "TypeError"
    assert raised == [(kind, message)] + [(kind, f"on rank 0 of the group: {kind}: {message}")] * (
        world - 1
    )

    raised = _raised(group(world), "total_weight")
    kind, message = _core_error(lambda: nllloss.total_weight(*_bad_total_weight(0, 1)))
    assert kind == "TypeError"
    assert raised[-1] == (kind, message)
    assert raised[:-1] == [(kind, f"on rank {world - 1} of the group: {kind}: {message}")] * (
        world - 1
    )


@pytest.mark.parametrize("world", WORLD_SIZES, ids=lambda w: f"{w} ranks")
def test_shards_that_do_not_tile_the_classes_are_refused_on_every_rank(group, world):
    raised = _raised(group(world), "overlapping shards")
    shards = ", ".join(f"rank {rank}: [0, 2)" for rank in range(world))
    expected = (
        "ValueError",
        f"the class shards of the group must cover the classes [0, {2 * world}) once each "
        f"(class_start and the input's class axis on each rank), got {shards}",
    )
    assert raised == [expected] * world


@pytest.mark.parametrize(("key", "name"), [("targets differ", "target"),
                                           ("reduction differs", "reduction"),
                                           ("dtypes differ", "the input's dtype"),
                                           ("weights differ", "weight"),
                                           ("weight on one rank only", "weight"),
                                           ("ignore_index differs", "ignore_index"),
                                           ("from_logits differs", "from_logits"),
                                           ("label_smoothing differs", "label_smoothing"),
                                           ("total_weight on one rank only", "total_weight"),
                                           ("total_weight differs", "total_weight"),
                                           ("z_loss differs", "z_loss"),
                                           ("softcap differs", "softcap"),
                                           ("probabilities on one rank only", "target"),
                                           ])  # fmt: skip
@pytest.mark.parametrize("world", WORLD_SIZES, ids=lambda w: f"{w} ranks")
def test_arguments_that_differ_between_ranks_are_refused_on_every_rank(group, world, key, name):
    raised = _raised(group(world), key)
    assert len(set(raised)) == 1
    kind, message = raised[0]
    assert kind == "ValueError"
    assert message.startswith(f"{name} must be the same on every rank of the group")
    assert re.search(r"rank 0 and rank \d passed different values", message)


@pytest.fixture
def one_rank():
    """A group of one process (this one), for what needs no other rank."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_total_weight_of_one_rank_is_the_local_total_weight(one_rank):
    t = torch.tensor([[0, 2], [-100, 2]])
    w = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float32)
    total = nllloss.distributed.total_weight(t, w)
    assert total.dtype == torch.float32
    assert total.shape == ()
    assert total.item() == 4.5
    count = nllloss.distributed.total_weight(t, ignore_index=2)
    assert count.dtype == torch.int64
    assert count.item() == 2


X = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -1.5, -2.5]], dtype=torch.float64)
T = torch.tensor([0, 2])


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"input_shard": X.numpy()}, TypeError, "input_shard must be a torch.Tensor .* numpy"),
        ({"class_start": 0.0}, TypeError, "class_start must be an int, not float"),
        ({"class_start": True}, TypeError, "class_start must be an int, not bool"),
        ({"class_start": -1}, ValueError, r"class_start must be a class index \(0 or more\)"),
        ({"class_start": 1}, ValueError, r"cover the classes \[0, 3\) .* rank 0: \[1, 4\)"),
        ({"reduction": "avg"}, ValueError, "avg is not a valid value for reduction"),
        ({"label_smoothing": 1.5}, ValueError, "label_smoothing must be between 0.0 and 1.0"),
        ({"from_logits": 1}, TypeError, "from_logits must be True or False"),
        ({"total_weight": 2.0, "reduction": "sum"}, ValueError, "total_weight is the denom"),
        ({"target": T.double()}, TypeError, "target must hold class indices of an integer"),
        ({"target": T[:1]}, ValueError, r"Expected input batch_size \(2\) to match"),
        ({"weight": [1.0, 2.0]}, ValueError, "weight tensor should be defined either for all 3"),
        ({"z_loss": 0.1}, ValueError, "z_loss=0.1 acts on logits: it needs from_logits=True"),
        ({"softcap": -1.0, "from_logits": True}, ValueError, "softcap must be None or a fin"),
        ({"target": X.exp(), "ignore_index": 1}, ValueError, "ignore_index is not supported"),
        ({"target": X[:, :2].exp()}, ValueError, r"must have the input's shape \(2, 3\)"),
        ({"target": T.view(2, 1).expand(2, 3)}, TypeError, "must be floating, got dtype torch"),
    ],
    ids=lambda p: p if isinstance(p, str) else None,
)
def test_bad_arguments_raise_the_core_errors(one_rank, kwargs, error, match):
    arguments = {"input_shard": X, "target": T, "class_start": 0, **kwargs}
    with pytest.raises(error, match=match):
        nllloss.distributed.nll_loss(
            arguments.pop("input_shard"), arguments.pop("target"), **arguments
        )


def test_deprecated_elementwise_mean_warns_at_the_callers_line(one_rank):
    with pytest.warns(UserWarning, match="elementwise_mean' is deprecated") as record:
        loss = nllloss.distributed.nll_loss(X, T, class_start=0, reduction="elementwise_mean")
    assert record[0].filename == __file__
    torch.testing.assert_close(loss, F.nll_loss(X, T), rtol=0, atol=0)


def test_inputs_are_not_modified_and_sequences_are_accepted(one_rank):
    x, t, w = X.clone().requires_grad_(), T.clone(), [1.0, 2.0, 0.5]
    loss = nllloss.distributed.nll_loss(x, t.numpy(), class_start=0, weight=w, from_logits=True)
    loss.backward()
    assert torch.equal(x.detach(), X)
    assert torch.equal(t, T)
    expected = F.cross_entropy(X, T, weight=torch.tensor(w, dtype=X.dtype))
    torch.testing.assert_close(loss, expected, **_tolerance(torch.float64))


@pytest.mark.parametrize("from_logits", [False, True])
def test_ignored_rows_of_nan_reach_neither_loss_nor_gradient(one_rank, from_logits):
    x = torch.cat([X, torch.full((1, 3), torch.nan, dtype=X.dtype)]).requires_grad_()
    t = torch.tensor([0, 2, -100])
    loss = nllloss.distributed.nll_loss(
        x, t, class_start=0, from_logits=from_logits, label_smoothing=0.1
    )
    loss.backward()
    expected = X.clone().requires_grad_()  # an ignored row is a dropped row
    reference = nllloss.distributed.nll_loss(
        expected, T, class_start=0, from_logits=from_logits, label_smoothing=0.1
    )
    reference.backward()
    torch.testing.assert_close(loss, reference, rtol=0, atol=0)
    assert torch.equal(x.grad[:2], expected.grad)
    assert torch.equal(x.grad[2], torch.zeros(3, dtype=X.dtype))


def test_attribute_of_nllloss_that_imports_torch_when_first_touched():
    code = (
        "import sys, nllloss; assert 'torch' not in sys.modules;"
        "nllloss.distributed.nll_loss; assert 'torch' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------------------------
# The documented data-parallel training step (docs/guide/training-at-scale.md), run as
# written on every rank.


def _documented_problem():
    """A model, a 12-row batch whose first 5 targets are ignored, class weights."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 5).double()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(12, 4, generator=gen, dtype=torch.float64)
    t = torch.randint(0, 5, (12,), generator=gen)
    t[:5] = -100
    weight = torch.tensor([1.0, 2.0, 0.5, 1.0, 3.0], dtype=torch.float64)
    return model, x, t, weight


def _documented_train_step(rank: int, world: int) -> dict:
    """The guide's ``train_step`` on this rank's rows, in micro-batches of up to 2 rows."""
    blocks = re.findall(r"```python\n(.*?)```", GUIDE.read_text(), flags=re.S)
    (block,) = [b for b in blocks if "def train_step" in b]
    namespace: dict = {}
    exec(block, namespace)
    model, x, t, weight = _documented_problem()
    a, b = np.array_split(np.arange(len(t)), world)[rank][[0, -1]].tolist()
    micro_batches = [
        (x[i : min(i + 2, b + 1)], t[i : min(i + 2, b + 1)]) for i in range(a, b + 1, 2)
    ]
    loss = namespace["train_step"](model, micro_batches, weight)
    return {"loss": loss, "grads": [p.grad for p in model.parameters()]}


@pytest.mark.parametrize("world", WORLD_SIZES, ids=lambda w: f"{w} ranks")
def test_documented_train_step_gives_the_full_batch_loss_and_gradient(group, world):
    results = _results(group(world), "documented")
    model, x, t, weight = _documented_problem()
    loss = F.cross_entropy(model(x), t, weight=weight)
    loss.backward()
    for result in results:
        torch.testing.assert_close(result["loss"], loss.detach(), **_tolerance(torch.float64))
        for grad, expected in zip(result["grads"], model.parameters(), strict=True):
            torch.testing.assert_close(grad, expected.grad, **_tolerance(torch.float64))

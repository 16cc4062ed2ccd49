"""Class-parallel loss (``nllloss.distributed.nll_loss``) against the unsharded loss, on the CPU.

Usage: ``python benchmarks/distributed.py [--ranks 2 4] [--shapes 4096x8192 ...] [--steps 10]``.
Prints the report; writes ``DIR/distributed-latest.md`` only with ``--out DIR``.

For each world size a group of processes is spawned (gloo over 127.0.0.1, one thread per
rank); rank r holds its slice of the classes of an (N, C) input, as in a vocabulary-parallel
head. A step is the forward and backward of the loss; its time is the slowest rank's (each
rank times its own step between two barriers, then the ranks take the maximum). The
unsharded reference is torch's ``F.cross_entropy`` (or ``F.nll_loss``) on the whole input in
one (spawned) process with one thread; world size 1 is ``nllloss.distributed.nll_loss`` on the whole
input (its own overhead). The bytes are counted by wrapping ``torch.distributed``'s
collectives during one step: what each rank hands to them (its payload), next to what
gathering the input instead would move.
"""

from __future__ import annotations

import argparse
import datetime
import os
import pickle
import platform
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing
import torch.nn.functional as F
from harness import CpuMeter, _cpu_model, _git_revision, _load_average

import nllloss
import nllloss.distributed

VARIANTS = {
    "logits": {"from_logits": True},
    "logits, weight, smoothing 0.1": {"from_logits": True, "weighted": True, "smoothing": 0.1},
    "log-probs": {"from_logits": False},
}
TIMEOUT = datetime.timedelta(seconds=300)


def _problem(shape, variant, seed=0):
    """The whole input, the target (10% ignored) and the weight (or None), float32."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen)
    if not VARIANTS[variant]["from_logits"]:
        x = x.log_softmax(1)
    t = torch.randint(0, shape[1], (shape[0],), generator=gen)
    t[torch.rand(shape[0], generator=gen) < 0.1] = -100
    w = torch.rand(shape[1], generator=gen) + 0.5 if VARIANTS[variant].get("weighted") else None
    return x, t, w


def _options(variant):
    spec = VARIANTS[variant]
    return {"from_logits": spec["from_logits"], "label_smoothing": spec.get("smoothing", 0.0)}


def _shards(classes: int, world: int) -> list[tuple[int, int]]:
    """Even shards (the last ranks one class fewer when C does not divide)."""
    base, extra = divmod(classes, world)
    sizes = [base + (r < extra) for r in range(world)]
    return [(sum(sizes[:r]), sizes[r]) for r in range(world)]


def _sharded_step(shard, t, start, w, options):
    def step():
        loss = nllloss.distributed.nll_loss(shard, t, class_start=start, weight=w, **options)
        loss.backward()
        shard.grad = None
        return loss.detach()

    return step


def _unsharded_step(x, t, w, options):
    def step():
        if options["from_logits"]:
            loss = F.cross_entropy(x, t, weight=w, label_smoothing=options["label_smoothing"])
        else:
            loss = F.nll_loss(x, t, weight=w)
        loss.backward()
        x.grad = None
        return loss.detach()

    return step


class _ByteCounter:
    """Counts what this rank hands to all_reduce and all_gather while active."""

    def __init__(self):
        self.bytes = 0
        self.calls = 0
        self._originals = {}

    def __enter__(self):
        for name in ("all_reduce", "all_gather"):
            original = self._originals[name] = getattr(dist, name)
            setattr(dist, name, self._counting(name, original))
        return self

    def _counting(self, name, original):
        def wrapper(*args, **kwargs):
            tensor = args[1] if name == "all_gather" else args[0]
            self.bytes += tensor.numel() * tensor.element_size()
            self.calls += 1
            return original(*args, **kwargs)

        return wrapper

    def __exit__(self, *exc):
        for name, original in self._originals.items():
            setattr(dist, name, original)


def _rank_main(rank, world, port, shapes, steps, out_dir):
    torch.set_num_threads(1)
    loopback = next(name for _, name in socket.if_nameindex() if name.startswith("lo"))
    os.environ["GLOO_SOCKET_IFNAME"] = loopback
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=TIMEOUT,
    )  # fmt: skip
    results = []
    for shape in shapes:
        for variant in VARIANTS:
            x, t, w = _problem(shape, variant)
            start, size = _shards(shape[1], world)[rank]
            shard = x[:, start : start + size].clone().requires_grad_()
            del x

            step = _sharded_step(shard, t, start, w, _options(variant))
            for _ in range(2):  # warm-up
                loss = step()
            with _ByteCounter() as counter:
                step()
            times = []
            for _ in range(steps):
                dist.barrier()
                begin = time.perf_counter()
                step()
                elapsed = torch.tensor([time.perf_counter() - begin], dtype=torch.float64)
                dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
                times.append(elapsed.item())
            results.append(
                {
                    "shape": shape,
                    "variant": variant,
                    "world": world,
                    "times": times,
                    "bytes": counter.bytes,
                    "collectives": counter.calls,
                    "loss": loss.item(),
                }
            )
    if rank == 0:
        with open(os.path.join(out_dir, f"world{world}.pkl"), "wb") as f:
            pickle.dump(results, f)
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_group(world, shapes, steps, out_dir):
    """World size 0: the unsharded reference (one process); else that many ranks."""
    torch.multiprocessing.start_processes(
        _rank_main if world else _unsharded_main,
        args=(world, _free_port(), shapes, steps, out_dir) if world else (shapes, steps, out_dir),
        nprocs=max(world, 1),
        join=True,
        start_method="spawn",
    )
    with open(os.path.join(out_dir, f"world{world}.pkl"), "rb") as f:
        return pickle.load(f)


def _unsharded_main(_rank, shapes, steps, out_dir):
    """torch's loss on the whole input, one process, one thread."""
    torch.set_num_threads(1)
    results = []
    for shape in shapes:
        for variant in VARIANTS:
            x, t, w = _problem(shape, variant)
            step = _unsharded_step(x.requires_grad_(), t, w, _options(variant))
            for _ in range(2):
                loss = step()
            times = []
            for _ in range(steps):
                begin = time.perf_counter()
                step()
                times.append(time.perf_counter() - begin)
            results.append(
                {"shape": shape, "variant": variant, "times": times, "loss": loss.item()}
            )
    with open(os.path.join(out_dir, "world0.pkl"), "wb") as f:
        pickle.dump(results, f)


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}"


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def markdown(env, reference, groups, worlds) -> str:
    lines = [
        "# nllloss.distributed benchmark (CPU, gloo)",
        "",
        *(f"- {key}: {value}" for key, value in env.items()),
        "",
        "Medians over the timed steps, in ms per forward + backward step (the slowest rank's). "
        "`ratio` = sharded / unsharded (below 1: faster). `payload` = bytes one rank hands to "
        "the collectives per step (all_gather + all_reduce inputs); `gather input` = what one "
        "rank would receive to rebuild the whole float32 input instead, N x (C - C_r) x 4.",
        "",
    ]
    header = ["shape (N x C)", "variant", "unsharded torch", "1 rank"]
    for world in worlds:
        header += [f"{world} ranks", "ratio", "payload", "gather input"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for ref in reference:
        key = (ref["shape"], ref["variant"])
        base = statistics.median(ref["times"])
        one = statistics.median(groups[1][key]["times"])
        row = ["x".join(map(str, ref["shape"])), ref["variant"], _ms(base)]
        row.append(f"{_ms(one)} ({one / base:.2f}x)")
        for world in worlds:
            result = groups[world][key]
            median = statistics.median(result["times"])
            n, c = ref["shape"]
            row += [
                _ms(median),
                f"{median / base:.2f}",
                f"{_size(result['bytes'])} in {result['collectives']} calls",
                _size(n * (c - c // world) * 4),
            ]
        lines.append("| " + " | ".join(row) + " |")
    cores = os.cpu_count() or 1
    if max(worlds) > cores:
        lines += [
            "",
            f"This machine has {cores} cores: with more ranks than cores, every collective "
            "waits for ranks that wait for a core, so those columns measure oversubscription, "
            "not the algorithm.",
        ]
    lines += ["", "Loss on rank 0 vs torch unsharded (relative difference):", ""]
    for ref in reference:
        key = (ref["shape"], ref["variant"])
        worst = max(abs(groups[w][key]["loss"] - ref["loss"]) / abs(ref["loss"]) for w in groups)
        lines.append(f"- {'x'.join(map(str, ref['shape']))} {ref['variant']}: {worst:.1e}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    parser.add_argument(
        "--shapes", nargs="+", default=["2048x8192", "512x65536"], help="NxC, float32"
    )
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument(
        "--rounds", type=int, default=2, help="runs of everything; the fastest median counts"
    )
    parser.add_argument(
        "--fresh-pages",
        action="store_true",
        help="leave glibc's malloc as it is (large buffers then come fresh from the kernel)",
    )
    parser.add_argument(
        "--out", type=Path, help="write DIR/distributed-latest.md (default: print it only)"
    )
    args = parser.parse_args(argv)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes]
    if not args.fresh_pages:
        # Every buffer from the heap, which is never trimmed: the ranks reuse their memory as
        # a training loop's caching allocator would. Otherwise glibc maps each buffer above
        # its mmap threshold fresh, and page faults (costly on virtual machines) decide the
        # times: a buffer of one size faults and one of half the size does not.
        os.environ.update(MALLOC_MMAP_MAX_="0", MALLOC_TRIM_THRESHOLD_=str(1 << 40))
    load_start, meter = _load_average(), CpuMeter()
    runs = {}  # world -> {(shape, variant): result of the round with the fastest median}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            for world in [0, 1, *args.ranks]:
                for r in _run_group(world, shapes, args.steps, tmp):
                    best = runs.setdefault(world, {}).get((r["shape"], r["variant"]))
                    if best is None or statistics.median(r["times"]) < statistics.median(
                        best["times"]
                    ):
                        runs[world][(r["shape"], r["variant"])] = r
    other = meter.share()
    reference = list(runs.pop(0).values())
    groups = runs
    env = {
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %z"),
        "machine": f"{platform.platform()}; {_cpu_model()}; {os.cpu_count()} cores",
        "versions": f"Python {platform.python_version()}, torch {torch.__version__}, "
        f"nllloss {nllloss.__version__}, git revision {_git_revision()}",
        "load average (1, 5, 15 min)": f"{load_start} at the start, {_load_average()} at the end",
        "other CPU": "n/a"
        if other is None
        else f"{other:.0%} of the machine used by other processes during the run",
        "setup": f"one thread per rank, {args.steps} timed steps after 2 warm-up steps, "
        f"the fastest median of {args.rounds} rounds, float32, 10% of targets ignored, "
        "mean reduction",
        "allocator": "glibc default (fresh pages for large buffers)"
        if args.fresh_pages
        else "glibc without mmap or trimming (memory reused, as a caching allocator does)",
    }
    text = markdown(env, reference, groups, args.ranks)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "distributed-latest.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Per-token statistics: ``token_stats`` and ``linear_token_stats`` against the loss and the
same statistics composed from torch operations.

Usage: ``python benchmarks/token_stats.py [--logits 8192x32000] [--linear 2048x512x32000]
[--rounds 5] [--out OUT]``. Prints the report; writes ``OUT.md`` and ``OUT.json`` with
``--out`` (the committed results: ``--out benchmarks/results/token-stats-latest``).

Every step is a forward and a backward in float32 (5% of the targets ignored): for the
statistics, the gradient of ``sum(logprob) + sum(entropy)``; for the loss, of its 'mean'.
From logits (``NxC``): ``stats numpy`` is ``token_stats_and_grad``, ``loss numpy``
``nll_loss_and_grad(from_logits=True)``; ``stats torch`` is ``token_stats`` with autograd,
``loss torch`` ``nll_loss(from_logits=True)`` with autograd, ``loss+stats torch`` the same
with ``return_stats=True`` (the loss's gradient), and ``composed torch`` the statistics
from ``log_softmax``, ``gather``, ``softmax`` and ``sum`` with autograd. From hidden states
(``NxDxV``): ``linear_token_stats`` against ``linear_cross_entropy``, NumPy (the
``_and_grad`` functions) and torch (autograd), and ``linear_cross_entropy(...,
return_stats=True)`` on torch.

The competitors of one table run in interleaved rounds (a shuffled order each round), each
round one step each; the report gives the median and the 90th percentile of the rounds and
the ratios of medians. Memory (hidden states only): each competitor once more in a fresh
subprocess, the peak resident memory of the step beyond what was resident before it
(``VmHWM`` after resetting it, minus ``VmRSS``), less the gradients it returns: what it
needed besides its inputs and results, against the size of the logits (N x V x 4 bytes).
The machine may be shared (its load average is recorded): compare within one run only.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("KMP_BLOCKTIME", "0")  # torch's idle OpenMP threads must not spin

import numpy as np

_SETUP = r"""
import numpy as np, torch, nllloss
F = torch.nn.functional

def logits_data(n, c):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, c), dtype=np.float32) * np.float32(2)
    t = rng.integers(0, c, n)
    t[rng.random(n) < 0.05] = -100
    return x, t

def linear_data(n, d, v):
    rng = np.random.default_rng(0)
    h = rng.standard_normal((n, d), dtype=np.float32)
    w = rng.standard_normal((v, d), dtype=np.float32) / np.float32(np.sqrt(d))
    t = rng.integers(0, v, n)
    t[rng.random(n) < 0.05] = -100
    return h, w, t

def composed(x, t):
    log_p = torch.log_softmax(x, 1)
    valid = t != -100
    logprob = torch.where(valid, log_p.gather(1, torch.where(valid, t, 0)[:, None])[:, 0], 0.0)
    entropy = -(torch.softmax(x, 1) * log_p).sum(1)
    return logprob, entropy

def logits_step(who, x, t):
    if who == "stats numpy":
        return nllloss.token_stats_and_grad(x, t, grad_logprob=1.0, grad_entropy=1.0)[1]
    if who == "loss numpy":
        return nllloss.nll_loss_and_grad(x, t, from_logits=True)[1]
    xt = torch.from_numpy(x).requires_grad_()
    tt = torch.from_numpy(t)
    if who == "stats torch":
        s = nllloss.token_stats(xt, tt)
        (s.logprob.sum() + s.entropy.sum()).backward()
    elif who == "loss+stats torch":
        nllloss.nll_loss(xt, tt, from_logits=True, return_stats=True).loss.backward()
    elif who == "loss torch":
        nllloss.nll_loss(xt, tt, from_logits=True).backward()
    else:
        logprob, entropy = composed(xt, tt)
        (logprob.sum() + entropy.sum()).backward()
    return xt.grad

def linear_step(who, h, w, t):
    if who == "stats numpy":
        return nllloss.linear_token_stats_and_grad(h, w, t, grad_logprob=1.0, grad_entropy=1.0)[1:3]
    if who == "loss numpy":
        return nllloss.linear_cross_entropy_and_grad(h, w, t)[1:3]
    ht, wt = torch.from_numpy(h).requires_grad_(), torch.from_numpy(w).requires_grad_()
    tt = torch.from_numpy(t)
    if who == "stats torch":
        s = nllloss.linear_token_stats(ht, wt, tt)
        (s.logprob.sum() + s.entropy.sum()).backward()
    elif who == "loss+stats torch":
        nllloss.linear_cross_entropy(ht, wt, tt, return_stats=True).loss.backward()
    else:
        nllloss.linear_cross_entropy(ht, wt, tt).backward()
    return ht.grad, wt.grad
"""

_MEMORY = (
    _SETUP
    + r"""
import sys
who, shape = sys.argv[1], tuple(int(v) for v in sys.argv[2].split("x"))
h, w, t = linear_data(*shape)
small = linear_data(64, shape[1], 1000)
linear_step(who, *small)  # compiles and warms up

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

open("/proc/self/clear_refs", "w").write("5")  # resets VmHWM to VmRSS
before = status("VmRSS")
grads = linear_step(who, h, w, t)
peak = status("VmHWM")
print(peak - before - sum(g.nbytes for g in grads))
"""
)

LOGITS = ("stats numpy", "loss numpy", "stats torch", "loss torch", "composed torch",
          "loss+stats torch")  # fmt: skip
LINEAR = ("stats numpy", "loss numpy", "stats torch", "loss torch", "loss+stats torch")


def _race(step, competitors, rounds, seed=0):
    """Per competitor, the times of ``rounds`` interleaved steps (after one warm-up each)."""
    for who in competitors:
        step(who)
    times = {who: [] for who in competitors}
    order = list(competitors)
    shuffler = random.Random(seed)
    for _ in range(rounds):
        shuffler.shuffle(order)
        for who in order:
            start = time.perf_counter()
            result = step(who)
            times[who].append(time.perf_counter() - start)
            del result
    return times


def _summary(times):
    ordered = sorted(times)
    p90 = ordered[min(len(ordered) - 1, int(np.ceil(0.9 * len(ordered))) - 1)]
    return {"median_s": statistics.median(times), "p90_s": p90, "runs_s": times}


def _table(namespace, kind, shape, competitors, rounds):
    """The race of ``competitors`` on data of ``shape`` (the data freed afterwards)."""
    data = namespace[f"{kind}_data"](*_parse(shape))
    step = namespace[f"{kind}_step"]
    times = _race(lambda who: step(who, *data), competitors, rounds)
    return {"shape": shape, **{who: _summary(t) for who, t in times.items()}}


def _parse(text):
    return tuple(int(v) for v in text.split("x"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logits", default="8192x32000")
    parser.add_argument("--linear", default="2048x512x32000")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    namespace: dict = {}
    exec(_SETUP, namespace)  # the same source as the memory subprocesses
    report = {"load_average_before": os.getloadavg(), "cpus": os.cpu_count()}
    import torch
    from harness import environment

    small = namespace["logits_data"](64, 1000)
    for who in LOGITS:
        namespace["logits_step"](who, *small)  # compiles the kernels
    report["logits"] = _table(namespace, "logits", args.logits, LOGITS, args.rounds)
    report["linear"] = _table(namespace, "linear", args.linear, LINEAR, args.rounds)
    n, _, v = _parse(args.linear)
    logits_bytes = n * v * 4
    memory = {}
    for who in LINEAR:
        out = subprocess.run([sys.executable, "-c", _MEMORY, who, args.linear],
                             capture_output=True, text=True, check=True)  # fmt: skip
        memory[who] = int(out.stdout.strip().splitlines()[-1])
    report["linear_extra_memory_bytes"] = memory
    report["logits_bytes"] = logits_bytes
    report["load_average_after"] = os.getloadavg()
    report = {"environment": environment({"torch": torch}, None), **report}
    text = markdown(report)
    print(text)
    if args.out:
        Path(args.out + ".json").write_text(json.dumps(report, indent=1))
        Path(args.out + ".md").write_text(text)
    return 0


def markdown(report) -> str:
    def ms(s):
        return f"{1e3 * s:.0f} ms"

    lines = [
        "# Per-token statistics: forward + backward (float32)",
        "",
        f"{report['cpus']} CPUs; load average before {report['load_average_before'][0]:.1f}, "
        f"after {report['load_average_after'][0]:.1f} (a shared machine: ratios within this "
        "run only).",
        "",
    ]
    for key, pairs in (
        ("logits", [("stats numpy", "loss numpy"), ("stats torch", "loss torch"),
                    ("composed torch", "stats torch")]),
        ("linear", [("stats numpy", "loss numpy"), ("stats torch", "loss torch")]),
    ):  # fmt: skip
        table = report[key]
        lines += [
            f"## {key} {table['shape']}",
            "",
            "| competitor | median | p90 |",
            "|---|---|---|",
        ]
        for who, t in table.items():
            if who != "shape":
                lines.append(f"| {who} | {ms(t['median_s'])} | {ms(t['p90_s'])} |")
        lines.append("")
        for a, b in pairs:
            ratio = table[a]["median_s"] / table[b]["median_s"]
            lines.append(f"- {a} / {b}: {ratio:.2f}x")
        lines.append("")
    lines += ["## linear: peak extra memory beyond inputs and gradients", ""]
    for who, extra in report["linear_extra_memory_bytes"].items():
        share = extra / report["logits_bytes"]
        lines.append(f"- {who}: {extra / 2**20:.0f} MiB ({100 * share:.1f}% of the logits)")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())

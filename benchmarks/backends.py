"""nllloss on torch tensors and JAX arrays against their own hand-written losses (CPU).

Usage: ``python benchmarks/backends.py [--quick] [--shapes 64x10 ...] [--out OUT]``; prints
the report, and writes ``OUT.{md,json}`` only with ``--out`` (the committed results:
``--out benchmarks/results/backends-latest``).

torch: ``nllloss.nll_loss`` on CPU tensors against ``torch.nn.functional.nll_loss``,
forward, and forward + ``loss.backward()`` (a fresh leaf each call). JAX: ``jax.jit`` of
``nllloss.nll_loss`` against ``jax.jit`` of the hand-written equivalent (the default
``ignore_index=-100`` masked, the mean over the rest), forward and ``value_and_grad``.
float32, 'mean', log-probability input with 10% of the targets ignored. Each pair races in
interleaved rounds (``harness.race``); ratios are between medians of one race.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from harness import FULL, QUICK, Competitor, environment, race

SHAPES = ((64, 10), (4096, 1000), (8192, 32000), (8, 21, 256, 256))


def make_data(shape, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.random(shape, dtype=np.float32)
    np.negative(x, out=x)
    t = rng.integers(0, shape[1], (shape[0], *shape[2:]))
    t[rng.random(t.shape) < 0.1] = -100
    return x, t


def torch_races(shape, settings, torch, nllloss):
    x, t = make_data(shape)
    xt, tt = torch.from_numpy(x), torch.from_numpy(t)
    F = torch.nn.functional

    def backward(loss_fn):
        def run():
            leaf = xt.detach().requires_grad_()
            loss_fn(leaf, tt).backward()
            return leaf.grad

        return run

    forward = [
        Competitor("F.nll_loss", lambda: F.nll_loss(xt, tt)),
        Competitor("nllloss", lambda: nllloss.nll_loss(xt, tt)),
    ]
    both = [
        Competitor("F.nll_loss", backward(F.nll_loss)),
        Competitor("nllloss", backward(nllloss.nll_loss)),
    ]
    return {"forward": race(forward, settings)[0], "forward+backward": race(both, settings)[0]}


def jax_races(shape, settings, jax, nllloss):
    jnp = jax.numpy
    x, t = make_data(shape)
    xj, tj = jax.device_put(x), jax.device_put(t.astype(np.int32))

    def hand_written(logp, target):
        valid = target != -100
        index = jnp.expand_dims(jnp.where(valid, target, 0), 1)
        picked = jnp.squeeze(jnp.take_along_axis(logp, index, axis=1), 1)
        return -jnp.sum(jnp.where(valid, picked, 0.0)) / jnp.sum(valid)

    def jitted(fn):
        compiled = jax.jit(fn)
        return lambda: compiled(xj, tj).block_until_ready()

    def jitted_grad(fn):
        compiled = jax.jit(jax.value_and_grad(fn))
        return lambda: compiled(xj, tj)[1].block_until_ready()

    forward = [
        Competitor("hand-written jnp", jitted(hand_written)),
        Competitor("nllloss", jitted(nllloss.nll_loss)),
    ]
    both = [
        Competitor("hand-written jnp", jitted_grad(hand_written)),
        Competitor("nllloss", jitted_grad(nllloss.nll_loss)),
    ]
    return {"forward": race(forward, settings)[0], "forward+backward": race(both, settings)[0]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--shapes", nargs="*", default=None)
    parser.add_argument(
        "--out", type=Path, help="write OUT.json and OUT.md (default: print the report only)"
    )
    args = parser.parse_args(argv)
    shapes = [tuple(int(d) for d in s.split("x")) for s in args.shapes] if args.shapes else SHAPES
    import jax
    import torch

    import nllloss

    settings = QUICK if args.quick else FULL
    report = {"environment": environment({"torch": torch, "jax": jax}, None), "cases": []}
    for shape in shapes:
        for library, races in (("torch", torch_races), ("jax", jax_races)):
            results = races(shape, settings, torch if library == "torch" else jax, nllloss)
            case = {"shape": list(shape), "library": library}
            for kind, timings in results.items():
                case[kind] = {name: 1e3 * t.median() for name, t in timings.items()}
            report["cases"].append(case)
            print(json.dumps(case), flush=True)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(report, indent=1, default=str))
        args.out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    return 0


def markdown(report):
    env = report["environment"]
    lines = [
        "# nllloss on torch tensors and JAX arrays vs hand-written losses (CPU, float32, mean)",
        "",
        f"Machine: {env.get('cpu_model')}, {env.get('cpu_count')} cores; versions "
        f"{env.get('versions')}. Medians of interleaved rounds in ms; ratio = ours / theirs "
        "(at most 1: ours as fast or faster).",
        "",
        "| shape | library | peer | fwd peer | fwd ours | ratio | f+b peer | f+b ours | ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for case in report["cases"]:
        fwd, both = case["forward"], case["forward+backward"]
        peer = next(name for name in fwd if name != "nllloss")
        shape = "x".join(map(str, case["shape"]))
        lines.append(
            f"| {shape} | {case['library']} | {peer} | {fwd[peer]:.4g} | {fwd['nllloss']:.4g} | "
            f"{fwd['nllloss'] / fwd[peer]:.2f} | {both[peer]:.4g} | {both['nllloss']:.4g} | "
            f"{both['nllloss'] / both[peer]:.2f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())

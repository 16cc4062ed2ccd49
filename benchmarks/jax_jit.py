"""nllloss from logits under ``jax.jit`` against optax's integer-label cross-entropy (CPU).

Usage: ``python benchmarks/jax_jit.py [--shapes 1024x1000 8192x32000] [--quick] [--busy]
[--out OUT]``. Prints the report; writes ``OUT.md`` and ``OUT.json`` (and a dated copy under
``history/``) only with ``--out`` (the committed results: ``--out
benchmarks/results/jax-jit-latest``). optax is needed only here (``pip install optax``).

Each case is ``jax.jit(jax.value_and_grad(loss))`` of the mean cross-entropy of float32
logits ``(N, C)`` against integer labels (no label ignored, so that both compute the same
number): ``nllloss.nll_loss(z, t, from_logits=True)`` against
``optax.softmax_cross_entropy_with_integer_labels(z, t).mean()``, and the forward alone
(``jax.jit(loss)``). The two race in interleaved rounds (``harness.race``): the
table gives p10, median and p90 per call in ms, and the ratio of medians of one race
(ours / optax: at most 1, ours as fast or faster). The machine may be shared: compare
within one run only.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

SHAPES = ((1024, 1000), (8192, 32000))


def races(shape, settings, jax, optax, nllloss):
    """{'forward' | 'forward+backward': {name: Timing}} at one shape."""
    from harness import Competitor, race

    jnp = jax.numpy
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.standard_normal(shape, dtype=np.float32))
    labels = jnp.asarray(rng.integers(0, shape[1], shape[0]).astype(np.int32))

    def ours(z, t):
        return nllloss.nll_loss(z, t, from_logits=True)

    def theirs(z, t):
        return optax.softmax_cross_entropy_with_integer_labels(z, t).mean()

    def timed(fn):
        compiled = jax.jit(fn)
        return lambda: jax.block_until_ready(compiled(logits, labels))

    results = {}
    for kind, wrap in (("forward", lambda f: f), ("forward+backward", jax.value_and_grad)):
        competitors = [
            Competitor("optax", timed(wrap(theirs))),
            Competitor("nllloss", timed(wrap(ours))),
        ]
        results[kind] = race(competitors, settings)[0]
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="*", default=None, help="NxC ...")
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    parser.add_argument(
        "--busy", action="store_true", help="one competing process keeps a core busy meanwhile"
    )
    parser.add_argument("--out", type=Path, help="write OUT.json and OUT.md")
    args = parser.parse_args(argv)
    shapes = [tuple(int(d) for d in s.split("x")) for s in args.shapes] if args.shapes else SHAPES
    import jax
    import optax
    from harness import FULL, QUICK, BusyMachine, environment, write_results

    import nllloss

    busy = BusyMachine(args.busy)
    report = {"environment": None, "busy": args.busy, "load": busy.describe(), "cases": []}
    with busy:
        for shape in shapes:
            timings = races(shape, QUICK if args.quick else FULL, jax, optax, nllloss)
            case = {"shape": list(shape)}
            for kind, by_name in timings.items():
                case[kind] = {name: timing.as_dict() for name, timing in by_name.items()}
            report["cases"].append(case)
            medians = {
                kind: {name: t.get("median_ms") for name, t in case[kind].items()}
                for kind in timings
            }
            print(json.dumps({"shape": case["shape"], "median_ms": medians}), flush=True)
    report["environment"] = environment({"jax": jax}, None)  # the load at the end
    report["environment"]["versions"]["optax"] = optax.__version__
    text = markdown(report)
    if args.out is not None:
        write_results(args.out, report, text)
    print(text)
    return 0


def markdown(report):
    env = report["environment"]
    lines = [
        "# nllloss from logits under jax.jit against optax (CPU, float32, mean)",
        "",
        f"{env.get('date')}, revision {env.get('git_revision')}. Machine: "
        f"{env.get('cpu_model')}, {env.get('cpu_count')} cores, load average at the end "
        f"{env.get('load_average_at_end')}; {report.get('load', '')}; jax "
        f"{env['versions'].get('jax')}, optax {env['versions'].get('optax')}. Per call in ms "
        "(p10 / median / p90 of interleaved rounds); ratio: ours / optax, medians of one race.",
        "",
        "| shape | pass | optax p10 / median / p90 | nllloss p10 / median / p90 | ratio |",
        "|---|---|---|---|---|",
    ]

    def cell(t):
        if "error" in t:
            return t["error"]
        return f"{t['p10_ms']:.3g} / {t['median_ms']:.3g} / {t['p90_ms']:.3g}"

    for case in report["cases"]:
        shape = "x".join(map(str, case["shape"]))
        for kind in ("forward", "forward+backward"):
            theirs, ours = case[kind]["optax"], case[kind]["nllloss"]
            ratio = (
                f"{ours['median_ms'] / theirs['median_ms']:.2f}"
                if "median_ms" in ours and "median_ms" in theirs
                else "—"
            )
            lines.append(f"| {shape} | {kind} | {cell(theirs)} | {cell(ours)} | {ratio} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())

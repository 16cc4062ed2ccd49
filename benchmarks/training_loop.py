"""A torch training step with nllloss's loss against the same step with torch's (CPU).

Usage: ``python benchmarks/training_loop.py [--quick] [--busy] [--shapes 4096x1000 ...]
[--no-transformer] [--out DIR]``. Prints the report; with ``--out DIR`` writes
``training-loop-latest.{md,json}`` (``training-loop-busy-latest`` with ``--busy``) and a
dated copy of both under ``DIR/history/`` (the committed ones: ``--out benchmarks/results``).

The loop is run as users run it: the benchmark sets no environment variable and no thread
count (torch and nllloss keep their defaults; the one setting nllloss makes itself, sleeping
idle workers for its kernels' OpenMP pool, is recorded as ``kernel_wait_policy``), torch is
imported first, and every step is the whole of ``zero_grad``, the forward, the loss,
``backward`` and an SGD step.

Cases:

* at each shape of the CPU table (``--shapes``; ``--quick`` leaves out 8192x32000), the
  logits come from one small layer, ``Linear(16, C)`` on ``(N, 16)`` features (a 1x1
  ``Conv2d(4, C)`` on ``(N, 4, d1, d2)`` for K-dim shapes), and the loss is the mean of

  - ``cross_entropy``: ``torch.nn.CrossEntropyLoss()`` against
    ``nllloss.torch.CrossEntropyLoss()``, from the logits;
  - ``nll``: ``torch.nn.NLLLoss()`` against ``nllloss.torch.NLLLoss()`` after the same
    ``log_softmax``;

* a tiny random ``LlamaForCausalLM`` (hidden size 64, 2 layers, 4 heads, no download) on 2
  sequences, labels with 5% ignored: its own loss (transformers' ``ForCausalLMLoss``)
  against ``nllloss.transformers.apply(model, fused_linear=False)`` (the logits, then
  ``nllloss.transformers.causal_lm_loss``), at V = 1,000 with 256 tokens and V = 32,000
  with 2,048 tokens.

The two competitors of a case (copies of the same weights) race in interleaved rounds of
one step each, in an order shuffled every round (``harness.race``), so that the
load of a shared machine falls on both alike: p10, median and p90 per step, and the ratio
of medians (torch's over nllloss's: 1 or more, nllloss's step as fast or faster). The
losses of the first step are compared. ``--busy`` starts one competing process that keeps
a core busy for the whole run.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

from harness import BusyMachine, Competitor, Settings, environment, race, write_results

SHAPES = ((64, 10), (4096, 1000), (8192, 32000), (1048576, 10), (8, 21, 256, 256))
QUICK_SKIPPED = ((8192, 32000),)
# (vocabulary, tokens) of the tiny Llama
TRANSFORMERS = ((1000, 256), (32000, 2048))
FEATURES = 16  # inputs of the Linear layer that makes (N, C) logits
CHANNELS = 4  # input channels of the 1x1 convolution that makes K-dim logits
LOSSES = ("cross_entropy", "nll")


def _settings(quick: bool):
    """Rounds of one step per competitor: at least 30 and 2 s each (quick: 15, 0.5 s). On a
    shared machine a step now and then waits 100 ms or more for a core, whatever its size:
    fewer steps leave the median to chance."""

    # sample_time far below a step: one step per run, so the percentiles are per step
    if quick:
        return Settings(warmup=2, min_runs=15, min_time=0.5, max_runs=200, sample_time=1e-9)
    return Settings(warmup=3, min_runs=30, min_time=2.0, max_runs=400, sample_time=1e-9)


def _stepper(model, forward_loss, torch):
    """One training step of ``model``: zero_grad, ``forward_loss(model)``, backward, SGD."""
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = forward_loss(model)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


def layer_cases(shape, loss, settings, torch, nllloss_torch):
    """{'torch' | 'nllloss': Timing} and the first steps' losses at one shape."""
    generator = torch.Generator().manual_seed(0)
    classes = shape[1]
    if len(shape) == 2:
        features = torch.randn(shape[0], FEATURES, generator=generator)
        layer = torch.nn.Linear(FEATURES, classes)
        target = torch.randint(0, classes, (shape[0],), generator=generator)
    else:
        features = torch.randn(shape[0], CHANNELS, *shape[2:], generator=generator)
        layer = torch.nn.Conv2d(CHANNELS, classes, 1)
        target = torch.randint(0, classes, (shape[0], *shape[2:]), generator=generator)
    if loss == "cross_entropy":
        criteria = {
            "torch": torch.nn.CrossEntropyLoss(),
            "nllloss": nllloss_torch.CrossEntropyLoss(),
        }
    else:
        criteria = {"torch": torch.nn.NLLLoss(), "nllloss": nllloss_torch.NLLLoss()}

    def forward_loss(model, criterion):
        logits = model(features)
        return criterion(logits if loss == "cross_entropy" else logits.log_softmax(1), target)

    competitors = [
        Competitor(
            who,
            _stepper(
                copy.deepcopy(layer),
                lambda model, criterion=criterion: forward_loss(model, criterion),
                torch,
            ),
        )
        for who, criterion in criteria.items()
    ]
    return race(competitors, settings)


def transformer_cases(vocab, tokens, settings, torch):
    """{'torch' | 'nllloss': Timing} and the first steps' losses of the tiny Llama."""
    import transformers

    import nllloss.transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config).train()
    ids = torch.randint(0, vocab, (2, tokens // 2))
    labels = ids.masked_fill(torch.rand(ids.shape) < 0.05, -100)
    ours = copy.deepcopy(model)
    nllloss.transformers.apply(ours, fused_linear=False)
    competitors = [
        Competitor(who, _stepper(m, lambda m: m(ids, labels=labels).loss, torch))
        for who, m in (("torch", model), ("nllloss", ours))
    ]
    return race(competitors, settings)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="*", default=None, help="NxC or NxCxd1xd2 ...")
    parser.add_argument("--quick", action="store_true", help="fewer steps; no 8192x32000")
    parser.add_argument(
        "--busy", action="store_true", help="one competing process keeps a core busy meanwhile"
    )
    parser.add_argument(
        "--no-transformer", action="store_true", help="leave the tiny Llama's steps out"
    )
    parser.add_argument("--out", type=Path, help="directory for the result files")
    args = parser.parse_args(argv)
    if args.shapes:
        shapes = [tuple(int(d) for d in s.split("x")) for s in args.shapes]
    else:
        shapes = [s for s in SHAPES if not (args.quick and s in QUICK_SKIPPED)]
    import torch  # first, as in a training script

    import nllloss.torch
    from nllloss._kernels.cpu import _threads

    settings = _settings(args.quick)
    busy = BusyMachine(args.busy)
    report = {"busy": args.busy, "load": busy.describe(), "cases": []}

    def record(case, timings, first):
        case["steps"] = {who: timing.as_dict() for who, timing in timings.items()}
        case["first_loss"] = {who: summary.get("loss") for who, summary in first.items()}
        report["cases"].append(case)
        medians = {who: t.get("median_ms") for who, t in case["steps"].items()}
        print(json.dumps({k: case[k] for k in case if k != "steps"} | {"median_ms": medians}))

    with busy:
        for shape in shapes:
            for loss in LOSSES:
                record(
                    {"model": "layer", "shape": list(shape), "loss": loss},
                    *layer_cases(shape, loss, settings, torch, nllloss.torch),
                )
        if not args.no_transformer:
            for vocab, tokens in TRANSFORMERS:
                record(
                    {"model": "llama", "vocab": vocab, "tokens": tokens, "loss": "causal_lm"},
                    *transformer_cases(vocab, tokens, settings, torch),
                )
    report["kernel_runs"] = dict(_threads.runs)  # kernel calls by twin (threads, one thread)
    report["environment"] = environment({"torch": torch}, None)  # the load at the end
    import transformers

    report["environment"]["versions"]["transformers"] = transformers.__version__
    text = markdown(report)
    if args.out is not None:
        name = "training-loop-busy-latest" if args.busy else "training-loop-latest"
        write_results(args.out / name, report, text)
    print(text)
    return 0


def case_name(case) -> str:
    """The case as the tables name it."""
    if case["model"] == "llama":
        return f"tiny Llama, V = {case['vocab']:,}, {case['tokens']:,} tokens"
    return f"{'x'.join(map(str, case['shape']))}, {case['loss']}"


def markdown(report):
    env = report["environment"]
    lines = [
        "# A torch training step with nllloss's loss against torch's (CPU, float32, mean)",
        "",
        f"{env.get('date')}, revision {env.get('git_revision')}. Machine: "
        f"{env.get('cpu_model')}, {env.get('cpu_count')} cores, load average at the end "
        f"{env.get('load_average_at_end')}; {report.get('load', '')}; torch "
        f"{env['versions'].get('torch')}, transformers {env['versions'].get('transformers')}; "
        f"no variable or thread count set; nllloss's kernel pool: "
        f"{env.get('kernel_wait_policy')}. Per step (zero_grad, forward, loss, backward, SGD) "
        "in ms, p10 / median / p90 of interleaved rounds; ratio: torch's median over "
        "nllloss's (1 or more: nllloss's step as fast or faster).",
        "",
        "| case | torch p10 / median / p90 | nllloss p10 / median / p90 | ratio | steps |",
        "|---|---|---|---|---|",
    ]

    def cell(t):
        if "error" in t:
            return t["error"]
        return f"{t['p10_ms']:.3g} / {t['median_ms']:.3g} / {t['p90_ms']:.3g}"

    for case in report["cases"]:
        theirs, ours = case["steps"]["torch"], case["steps"]["nllloss"]
        ratio = (
            f"{theirs['median_ms'] / ours['median_ms']:.2f}x"
            if "median_ms" in ours and "median_ms" in theirs
            else "—"
        )
        lines.append(
            f"| {case_name(case)} | {cell(theirs)} | {cell(ours)} | {ratio} | "
            f"{ours.get('runs', '—')} |"
        )
    runs = report.get("kernel_runs", {})
    lines += [
        "",
        f"nllloss's kernel calls: {runs.get('parallel')} on threads, {runs.get('serial')} on "
        "one thread (each kernel picks the faster lately, `nllloss._kernels.cpu._threads`).",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())

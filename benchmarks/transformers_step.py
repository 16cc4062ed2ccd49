"""A transformers causal LM's training step, patched by ``nllloss.transformers.apply`` or not.

Usage: ``python benchmarks/transformers_step.py [--vocab 32000 128256] [--tokens 2048]
[--steps 9] [--out OUT]``. Prints the report; writes ``OUT.md`` and ``OUT.json`` only with
``--out`` (the committed results: ``--out benchmarks/results/transformers-step-latest``).

The model is a tiny random Llama (hidden size 64, 2 layers, 4 heads, untied embeddings)
with a vocabulary of V, so that the head and its loss are most of the step: a batch of
2 x (tokens / 2) token ids, 5% of the labels ignored. A step is ``zero_grad``, the forward
with labels, ``backward`` and an SGD step, float32.

Time: the competitors are built in one process (copies of the same weights), warmed up
by one step each, then run ``--steps`` rounds of one step each, in a shuffled order, so
that the load of a shared machine falls on all alike (median and 90th percentile).
Memory: each competitor in a fresh process, the peak resident memory of one step after a
warm-up step beyond what was resident before it (``VmHWM`` after resetting it, minus
``VmRSS``).

Competitors: ``body`` is the same model's body alone (``model.model``) with a loss that
needs nothing more (the mean square of the final hidden states): the floor every step
shares. ``transformers`` is the unpatched model (logits, then ``ForCausalLMLoss``);
``nllloss`` the model after ``apply(model)`` (the loss from the hidden states, no logits);
``nllloss logits`` after ``apply(model, fused_linear=False)`` (the logits, then
``causal_lm_loss``). The loss's extra memory is a step's peak minus the body's, shown as a
share of the float32 logits (tokens x V x 4 bytes). The machine may be shared: compare
within one run only.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

VOCABS = (32000, 128256)
COMPETITORS = ("body", "transformers", "nllloss", "nllloss logits")

_SETUP = r"""
import copy, os, random, statistics, time
import torch, transformers, nllloss.transformers
vocab, tokens, steps = {vocab!r}, {tokens!r}, {steps!r}
transformers.logging.set_verbosity_error()

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

torch.manual_seed(0)
config = transformers.LlamaConfig(
    vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False,
)
ids = torch.randint(0, vocab, (2, tokens // 2))
labels = ids.masked_fill(torch.rand(ids.shape) < 0.05, -100)

def competitor(who, model):
    if who == "nllloss":
        nllloss.transformers.apply(model)
    elif who == "nllloss logits":
        nllloss.transformers.apply(model, fused_linear=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step():
        optimizer.zero_grad(set_to_none=True)
        if who == "body":
            loss = model.model(ids).last_hidden_state.square().mean()
        else:
            loss = model(ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        return float(loss)

    return step
"""

# Memory: one competitor in a fresh process, the peak of one step after a warm-up step.
_MEMORY = (
    _SETUP
    + r"""
step = competitor({who!r}, transformers.LlamaForCausalLM(config).train())
step()  # imports, compiles, allocators warm
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the peak (VmHWM) starts again from the current resident size
before = status("VmRSS")
loss = step()
print(status("VmHWM") - before, loss)
"""
)

# Time: every competitor in one process (the same weights), in rounds of one step each in a
# shuffled order, so that the load of a shared machine falls on all of them alike.
_TIME = (
    _SETUP
    + r"""
model = transformers.LlamaForCausalLM(config).train()
runs = {{who: competitor(who, copy.deepcopy(model)) for who in {competitors!r}}}
for step in runs.values():
    step()
times = {{who: [] for who in runs}}
order = list(runs)
for _ in range(steps):
    random.Random(len(times[order[0]])).shuffle(order)
    for who in order:
        start = time.perf_counter()
        runs[who]()
        times[who].append(time.perf_counter() - start)
for who, seconds in times.items():
    seconds.sort()
    print(who, "|", statistics.median(seconds), seconds[round(0.9 * (len(seconds) - 1))])
"""
)


def _python(code: str) -> list[str] | None:
    """The stdout lines of ``code`` in a fresh interpreter, or None when it fails."""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=7200
    )
    if done.returncode:
        print("failed:", done.stderr[-800:], file=sys.stderr)
        return None
    return done.stdout.splitlines()


def run_vocab(vocab, tokens, steps) -> list[dict]:
    """Every competitor's median and p90 seconds (one process), peak bytes and loss (one
    fresh process each)."""
    settings = {"vocab": vocab, "tokens": tokens, "steps": steps}
    timed = _python(_TIME.format(competitors=COMPETITORS, **settings)) or []
    seconds = {}
    for line in timed:
        who, numbers = line.split(" | ")
        seconds[who] = [float(x) for x in numbers.split()]
    cases = []
    for who in COMPETITORS:
        measured = _python(_MEMORY.format(who=who, **settings))
        peak, loss = measured[-1].split() if measured else (None, None)
        median, p90 = seconds.get(who, (None, None))
        cases.append({
            "vocab": vocab, "who": who, "median_s": median, "p90_s": p90,
            "peak_bytes": None if peak is None else int(peak),
            "loss": None if loss is None else float(loss),
        })  # fmt: skip
    return cases


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", nargs="*", type=int, default=list(VOCABS))
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=9)
    parser.add_argument("--out", type=Path, help="write OUT.json and OUT.md")
    args = parser.parse_args(argv)
    import torch
    import transformers
    from harness import environment

    report = {
        "tokens": args.tokens,
        "steps": args.steps,
        "cases": [],
    }
    for vocab in args.vocab:
        for case in run_vocab(vocab, args.tokens, args.steps):
            report["cases"].append(case)
            print(json.dumps(case), flush=True)
    report["environment"] = environment({"torch": torch}, None)  # the load at the end
    report["environment"]["versions"]["transformers"] = transformers.__version__
    text = markdown(report)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(report, indent=1, default=str))
        args.out.with_suffix(".md").write_text(text)
    print(text)
    return 0


def markdown(report):
    env, tokens = report["environment"], report["tokens"]
    lines = [
        "# A transformers causal LM's training step: unpatched, and patched by nllloss (CPU)",
        "",
        f"Machine: {env.get('cpu_model')}, {env.get('cpu_count')} cores, load average at "
        f"the end {env.get('load_average_at_end')}; torch {env['versions'].get('torch')}, "
        f"transformers {env['versions'].get('transformers')}. A tiny random Llama (hidden "
        f"64, 2 layers) at {tokens} tokens (2 sequences), float32. Time: median and 90th "
        f"percentile of {report['steps']} steps (zero_grad, forward with labels, backward, "
        "SGD step), the competitors interleaved in one process. Extra memory: the step's "
        "peak resident memory beyond the body-only step's (fresh processes), in MiB and as "
        "a share of the float32 logits. Time ratio: the "
        "unpatched step's median over this one's (above 1: faster).",
        "",
    ]
    for vocab in dict.fromkeys(c["vocab"] for c in report["cases"]):
        cases = {c["who"]: c for c in report["cases"] if c["vocab"] == vocab}
        logits = tokens * vocab * 4
        body = cases.get("body", {}).get("peak_bytes")
        unpatched = cases.get("transformers", {}).get("median_s")
        lines += [
            f"## V = {vocab} (logits {logits / 2**20:.0f} MiB)",
            "",
            "| step | median s | p90 s | unpatched / this | peak MiB | extra MiB | extra / logits "
            "| loss |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for who, c in cases.items():
            median, peak = c["median_s"], c["peak_bytes"]
            extra = None if (peak is None or body is None or who == "body") else peak - body
            cells = [
                who,
                "—" if median is None else f"{median:.3f}",
                "—" if c["p90_s"] is None else f"{c['p90_s']:.3f}",
                "—"
                if not (median and unpatched) or who == "body"
                else f"{unpatched / median:.2f}x",
                "—" if peak is None else f"{peak / 2**20:.0f}",
                "—" if extra is None else f"{extra / 2**20:.0f}",
                "—" if extra is None else f"{100 * extra / logits:.1f}%",
                "—" if c["loss"] is None else f"{c['loss']:.6f}",
            ]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

"""A transformers causal LM's training step, patched by ``nllloss.transformers.apply`` or not.

Usage: ``python benchmarks/transformers_step.py [--vocab 32000 128256] [--tokens 2048]
[--steps 9] [--out OUT]``. Prints the report; writes ``OUT.md`` and ``OUT.json`` only with
``--out`` (the committed results: ``--out benchmarks/results/transformers-step-latest``).

The model is a tiny random Llama (hidden size 64, 2 layers, 4 heads, untied embeddings)
with a vocabulary of V, so that the head and its loss are most of the step: a batch of
2 x (tokens / 2) token ids, 5% of the labels ignored. A step is ``zero_grad``, the forward
with labels, ``backward`` and an SGD step, float32. Each competitor runs in a fresh
subprocess: one warm-up step, then ``--steps`` timed steps (median and 90th percentile).
Memory: the peak resident memory of the first timed step beyond what was resident before
it (``VmHWM`` after resetting it, minus ``VmRSS``).

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
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("KMP_BLOCKTIME", "0")  # torch's idle OpenMP threads must not spin

VOCABS = (32000, 128256)
COMPETITORS = ("body", "transformers", "nllloss", "nllloss logits")

_CASE = r"""
import os, statistics, time
os.environ["KMP_BLOCKTIME"] = "0"
import torch, transformers, nllloss.transformers
who, vocab, tokens, steps = {who!r}, {vocab!r}, {tokens!r}, {steps!r}
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
model = transformers.LlamaForCausalLM(config).train()
if who == "nllloss":
    nllloss.transformers.apply(model)
elif who == "nllloss logits":
    nllloss.transformers.apply(model, fused_linear=False)
optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
ids = torch.randint(0, vocab, (2, tokens // 2))
labels = ids.masked_fill(torch.rand(ids.shape) < 0.05, -100)

def step():
    optimizer.zero_grad(set_to_none=True)
    if who == "body":
        loss = model.model(ids).last_hidden_state.square().mean()
    else:
        loss = model(ids, labels=labels).loss
    loss.backward()
    optimizer.step()
    return float(loss)

step()  # imports, compiles, allocators warm
optimizer.zero_grad(set_to_none=True)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the peak (VmHWM) starts again from the current resident size
before = status("VmRSS")
times = []
for i in range(steps):
    start = time.perf_counter()
    loss = step()
    times.append(time.perf_counter() - start)
    if i == 0:
        peak = status("VmHWM") - before
times.sort()
p90 = times[round(0.9 * (len(times) - 1))]  # nearest rank
print(statistics.median(times), p90, peak, loss)
"""


def run_case(who, vocab, tokens, steps):
    """(median s, p90 s, peak bytes, last loss) of one competitor, or Nones when its
    subprocess fails (out of memory, say)."""
    code = _CASE.format(who=who, vocab=vocab, tokens=tokens, steps=steps)
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=3600
    )
    if done.returncode:
        print(who, vocab, "failed:", done.stderr[-800:], file=sys.stderr)
        return None, None, None, None
    median, p90, peak, loss = done.stdout.split()[-4:]
    return float(median), float(p90), int(peak), float(loss)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", nargs="*", type=int, default=list(VOCABS))
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=9)
    parser.add_argument("--out", type=Path, help="write OUT.json and OUT.md")
    args = parser.parse_args(argv)
    import torch
    import transformers

    from nllloss._bench import environment

    report = {
        "tokens": args.tokens,
        "steps": args.steps,
        "cases": [],
    }
    for vocab in args.vocab:
        for who in COMPETITORS:
            median, p90, peak, loss = run_case(who, vocab, args.tokens, args.steps)
            case = {"vocab": vocab, "who": who, "median_s": median, "p90_s": p90}
            case |= {"peak_bytes": peak, "loss": loss}
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
        f"64, 2 layers) at {tokens} tokens (2 sequences), float32; each row a fresh process: "
        f"median and 90th percentile of {report['steps']} steps (zero_grad, forward with "
        "labels, backward, SGD step). Extra memory: the step's peak resident memory beyond "
        "the body-only step's, in MiB and as a share of the float32 logits. Time ratio: the "
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

"""Hugging Face in one line: train a causal LM whose loss never forms the logits.

A tiny random Llama (built from a config: nothing is downloaded) is trained twice by
``transformers.Trainer`` with gradient accumulation over micro-batches of different token
counts: once as transformers computes its loss, once after ``nllloss.transformers.apply``.
The losses agree to float rounding and the trained weights to a small fraction of one
step (AdamW divides each gradient by its own running size, so rounding in a gradient near
zero can move a weight by a fraction of the learning rate); the patched model never forms
the (tokens x vocabulary) logits. Run: ``python examples/hf_one_line.py``.
"""

from __future__ import annotations

import copy
import tempfile

import torch
import transformers

import nllloss.transformers


def examples(count: int = 16, length: int = 24, vocab: int = 500) -> list[dict]:
    """Token ids of different lengths, right-padded; padding is never trained (-100)."""
    generator = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(count):
        used = int(torch.randint(6, length + 1, (), generator=generator))
        ids = torch.randint(1, vocab, (length,), generator=generator)
        mask = (torch.arange(length) < used).long()
        ids = ids * mask  # pad with token 0
        rows.append(
            {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
        )
    return rows


def train(model, rows, steps: int) -> list[float]:
    """``steps`` optimiser steps of 4 micro-batches of 2 sequences; the logged losses."""
    with tempfile.TemporaryDirectory() as out:
        arguments = transformers.TrainingArguments(
            output_dir=out, per_device_train_batch_size=2, gradient_accumulation_steps=4,
            max_steps=steps, learning_rate=1e-3, logging_steps=1, report_to="none",
            use_cpu=True, save_strategy="no", seed=0, disable_tqdm=True,
        )  # fmt: skip
        trainer = transformers.Trainer(model=model, args=arguments, train_dataset=rows)
        trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def main(steps: int = 2) -> tuple[list[float], list[float], float]:
    transformers.logging.set_verbosity_error()
    config = transformers.LlamaConfig(
        vocab_size=500, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    unpatched = copy.deepcopy(model)

    nllloss.transformers.apply(model)  # the one line

    rows = examples()
    expected, actual = train(unpatched, rows, steps), train(model, rows, steps)
    weights = dict(unpatched.named_parameters())
    difference = max(
        float((parameter - weights[name]).detach().abs().max())
        for name, parameter in model.named_parameters()
    )
    print("transformers losses:", expected)
    print("nllloss losses:     ", actual)
    print(f"largest difference between the trained weights: {difference:.2e}")
    return expected, actual, difference


if __name__ == "__main__":
    main()

"""nllloss.transformers under the trainers that drive most training: transformers.Trainer
with gradient accumulation, and TRL's SFTTrainer with its fused LM head."""

from __future__ import annotations

import pytest
import torch
import transformers
from test_transformers import VOCAB, pair

import nllloss.transformers as nt


@pytest.fixture(params=["compiled"], autouse=True)
def numpy_engine(request):
    """Whole training runs are slow: these run on the numba kernels only (the loss itself is
    compared on both engines in test_transformers.py)."""
    return request.param


def spy_on_linear_cross_entropy(monkeypatch) -> list:
    """The reductions of every call of nllloss's loss from hidden states by the patched models."""
    calls = []

    def spy(*args, **kwargs):
        calls.append(kwargs.get("reduction", "mean"))
        return nt_linear_cross_entropy(*args, **kwargs)

    nt_linear_cross_entropy = nt.linear_cross_entropy
    monkeypatch.setattr(nt, "linear_cross_entropy", spy)
    return calls


def token_rows(count: int, seed: int = 3) -> list[dict]:
    """Tokenizer-free examples of different lengths (so batches are padded)."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(5, 13, (count,), generator=generator).tolist()
    return [{"input_ids": torch.randint(2, VOCAB, (n,), generator=generator).tolist()}
            for n in lengths]  # fmt: skip


def test_trainer_with_gradient_accumulation_trains_as_the_unpatched_model(tmp_path, monkeypatch):
    """transformers.Trainer passes num_items_in_batch (the shifted-label count of the
    accumulated batch) to the patched forward: same losses and parameters as unpatched."""
    calls = spy_on_linear_cross_entropy(monkeypatch)
    rows = []
    for example in token_rows(12):
        ids = torch.tensor(example["input_ids"] + [0] * (12 - len(example["input_ids"])))
        mask = (torch.arange(12) < len(example["input_ids"])).long()
        rows.append(
            {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
        )

    def train(model):
        arguments = transformers.TrainingArguments(
            output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=3,
            max_steps=2, learning_rate=1e-2, logging_steps=1, report_to="none", use_cpu=True,
            save_strategy="no", seed=0, disable_tqdm=True, optim="sgd",
        )  # fmt: skip
        trainer = transformers.Trainer(model=model, args=arguments, train_dataset=rows)
        assert trainer.model_accepts_loss_kwargs  # so it passes num_items_in_batch
        trainer.train()
        return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]

    reference, patched = pair("qwen3")
    expected, actual = train(reference), train(patched)
    assert calls == ["sum"] * 6  # 2 steps of 3 micro-batches, each divided by the step's count
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=0)
    weights = dict(patched.named_parameters())
    for name, parameter in reference.named_parameters():
        torch.testing.assert_close(weights[name], parameter, rtol=1e-4, atol=1e-6)


def test_trl_sft_trainer_takes_its_fused_head_loss_from_nllloss(tmp_path, monkeypatch):
    """TRL's SFTTrainer replaces the model's forward by its own chunked head and calls
    model(..., fused_lm_head=True): patched after the trainer is built, that call's per-token
    log-probabilities come from nllloss, and training matches TRL's own head."""
    trl = pytest.importorskip("trl")  # a test dependency: this skips only outside the test extra
    tokenizers = pytest.importorskip("tokenizers")
    from datasets import Dataset

    vocabulary = {"<pad>": 0, "<eos>": 1} | {f"t{i}": i for i in range(2, VOCAB)}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocabulary, unk_token="<pad>"))
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>"
    )
    dataset = Dataset.from_list(token_rows(8))
    trl_heads = []
    original_head = trl.trainer.utils._ChunkedLogProbFunction.apply
    monkeypatch.setattr(
        trl.trainer.utils._ChunkedLogProbFunction, "apply",
        lambda *args: trl_heads.append(1) or original_head(*args),
    )  # fmt: skip
    calls = spy_on_linear_cross_entropy(monkeypatch)

    def train(model, patch):
        arguments = trl.SFTConfig(
            output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2,
            max_steps=2, learning_rate=1e-2, logging_steps=1, report_to="none", use_cpu=True,
            save_strategy="no", seed=0, disable_tqdm=True, max_length=16, optim="sgd",
            activation_checkpointing=True,  # SFTConfig's default, by its current name
            bf16=False,  # SFTConfig's default: autocast, whose bfloat16 logits differ from float32
        )  # fmt: skip
        trainer = trl.SFTTrainer(
            model=model, args=arguments, train_dataset=dataset, processing_class=tokenizer
        )
        if patch:
            nt.apply(trainer.model)
        trainer.train()
        return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]

    reference, patched = pair("llama")
    expected = train(reference, patch=False)
    assert len(trl_heads) == 4
    assert not calls
    actual = train(patched, patch=True)
    assert len(trl_heads) == 4
    assert calls == ["none"] * 4
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=0)
    weights = dict(patched.named_parameters())
    for name, parameter in reference.named_parameters():
        torch.testing.assert_close(weights[name], parameter, rtol=1e-4, atol=1e-6)


def test_the_example_script_trains_as_it_says():
    import pathlib
    import runpy

    script = pathlib.Path(__file__).parents[1] / "examples" / "hf_one_line.py"
    expected, actual, difference = runpy.run_path(str(script))["main"](steps=1)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=0)
    assert difference < 1e-2 * 1e-3  # 1% of one AdamW step at the example's learning rate

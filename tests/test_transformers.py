"""nllloss.transformers against transformers itself: tiny random causal LMs built from
configs (no downloads), patched and unpatched copies of the same weights."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
import transformers
from transformers.loss.loss_utils import ForCausalLMLoss

import nllloss.transformers as nt

VOCAB = 211
SMALL = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2}  # fmt: skip

# (model class, config): every post-processing of the logits nllloss knows, tied and untied
# embeddings, an lm_head with a bias
ARCHITECTURES = {
    "llama": (transformers.LlamaForCausalLM, transformers.LlamaConfig(**SMALL)),
    "llama-tied": (
        transformers.LlamaForCausalLM, transformers.LlamaConfig(**SMALL, tie_word_embeddings=True),
    ),
    "qwen3": (transformers.Qwen3ForCausalLM, transformers.Qwen3Config(**SMALL, head_dim=8)),
    "mistral": (transformers.MistralForCausalLM, transformers.MistralConfig(**SMALL)),
    "gemma2-softcap": (
        transformers.Gemma2ForCausalLM,
        transformers.Gemma2Config(**SMALL, head_dim=8, final_logit_softcapping=0.5),
    ),
    "cohere-logit-scale": (
        transformers.CohereForCausalLM, transformers.CohereConfig(**SMALL, logit_scale=3.5),
    ),
    "granite-logits-scaling": (
        transformers.GraniteForCausalLM, transformers.GraniteConfig(**SMALL, logits_scaling=0.25),
    ),
    "phi3": (transformers.Phi3ForCausalLM, transformers.Phi3Config(**SMALL, pad_token_id=0)),
    "phi-bias": (transformers.PhiForCausalLM, transformers.PhiConfig(**SMALL)),
}  # fmt: skip


def pair(name: str, seed: int = 0):
    """An unpatched model and a patched copy with the same weights, in training mode."""
    cls, config = ARCHITECTURES[name]
    torch.manual_seed(seed)
    reference = cls(copy.deepcopy(config)).train()  # trainers write into the config
    return reference, nt.apply(copy.deepcopy(reference))


def batch(rows: int = 3, length: int = 11, seed: int = 1):
    """Token ids, an attention mask with right padding, labels ignored on the padding and on a
    prompt (different counts per row)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (rows, length), generator=generator)
    mask = torch.ones_like(ids)
    labels = ids.clone()
    for row in range(rows):
        mask[row, length - 2 * row :] = 0
        labels[row, length - 2 * row :] = -100
        labels[row, : row + 1] = -100
    return ids, mask, labels


def assert_same_step(reference, patched, losses) -> None:
    """Same loss (rtol 1e-5) and the same gradient of every parameter (rtol 1e-4, atol 1e-6)."""
    expected, actual = losses
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=0)
    grads = dict(patched.named_parameters())
    for name, parameter in reference.named_parameters():
        torch.testing.assert_close(grads[name].grad, parameter.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_loss_and_gradients_equal_the_unpatched_model(name):
    reference, patched = pair(name)
    ids, mask, labels = batch()
    expected = reference(ids, attention_mask=mask, labels=labels)
    actual = patched(ids, attention_mask=mask, labels=labels)
    assert actual.logits is None
    assert expected.logits is not None
    expected.loss.backward()
    actual.loss.backward()
    assert_same_step(reference, patched, (expected.loss, actual.loss))


@pytest.mark.parametrize("name", ["llama", "gemma2-softcap", "phi-bias"])
@pytest.mark.parametrize("denominator", [torch.tensor(23), torch.tensor(23.5), 17])
def test_num_items_in_batch_divides_the_sum(name, denominator):
    reference, patched = pair(name)
    ids, mask, labels = batch()
    expected = reference(ids, attention_mask=mask, labels=labels, num_items_in_batch=denominator)
    actual = patched(ids, attention_mask=mask, labels=labels, num_items_in_batch=denominator)
    expected.loss.backward()
    actual.loss.backward()
    assert_same_step(reference, patched, (expected.loss, actual.loss))


def test_shift_labels_and_logits_to_keep():
    reference, patched = pair("cohere-logit-scale")
    ids, mask, labels = batch()
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
    keep = 4  # the last 4 positions only, scored against their own shifted labels
    kwargs = {
        "attention_mask": mask,
        "shift_labels": shifted[:, -keep:].contiguous(),
        "logits_to_keep": keep,
    }
    expected = reference(ids, labels=labels, **kwargs)
    actual = patched(ids, labels=labels, **kwargs)
    expected.loss.backward()
    actual.loss.backward()
    assert_same_step(reference, patched, (expected.loss, actual.loss))


def test_gradient_accumulation_equals_the_whole_batch():
    """Micro-batches with different numbers of trained tokens, each divided by the whole
    batch's shifted count: their gradients add up to the whole batch's mean."""
    reference, patched = pair("llama")
    ids, mask, labels = batch(rows=4, length=12)
    whole = reference(ids, attention_mask=mask, labels=labels).loss
    whole.backward()
    pieces = [slice(0, 1), slice(1, 4)]
    total = nt.num_items_in_batch([labels[p] for p in pieces])
    counts = [int((labels[p][:, 1:] != -100).sum()) for p in pieces]
    assert counts[0] != counts[1] / 3  # the micro-batches' token counts differ
    summed = sum(
        patched(ids[p], attention_mask=mask[p], labels=labels[p], num_items_in_batch=total).loss
        for p in pieces
    )
    summed.backward()
    assert_same_step(reference, patched, (whole, summed))


def test_num_items_in_batch_counts_shifted_labels():
    labels = torch.tensor([[7, 8, -100, 9], [-100, -100, 3, 4], [1, -100, -100, -100]])
    # by hand: row 0 trains on 8, 9; row 1 on 3, 4; row 2 on nothing
    assert nt.num_items_in_batch(labels).item() == 4
    assert nt.num_items_in_batch(labels, shift_labels=False).item() == 6
    assert nt.num_items_in_batch([labels, labels[:1]]).item() == 6
    assert nt.num_items_in_batch(labels, ignore_index=7).item() == 9


def test_without_labels_outputs_and_generate_are_unchanged():
    reference, patched = pair("gemma2-softcap")
    reference.eval()
    patched.eval()
    ids, mask, _ = batch()
    with torch.no_grad():
        assert torch.equal(patched(ids, attention_mask=mask).logits,
                           reference(ids, attention_mask=mask).logits)  # fmt: skip
        shifted = patched(ids, attention_mask=mask, shift_labels=ids)  # no labels: no loss
        assert shifted.loss is None
        assert shifted.logits is not None
        prompt = ids[:, :3]
        expected = reference.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
        actual = patched.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(actual, expected)


def test_return_dict_false_gives_the_tuple_without_logits():
    reference, patched = pair("llama")
    ids, mask, labels = batch()
    expected = reference(ids, attention_mask=mask, labels=labels, return_dict=False)
    actual = patched(ids, attention_mask=mask, labels=labels, return_dict=False)
    assert isinstance(actual, tuple)
    assert len(actual) == len(expected) - 1
    torch.testing.assert_close(actual[0], expected[0], rtol=1e-5, atol=0)


def test_fused_linear_false_keeps_the_logits():
    reference, patched = pair("phi-bias")
    nt.apply(patched, fused_linear=False)  # a second call only changes the option
    ids, mask, labels = batch()
    expected = reference(ids, attention_mask=mask, labels=labels)
    actual = patched(ids, attention_mask=mask, labels=labels)
    assert torch.equal(actual.logits, expected.logits)
    expected.loss.backward()
    actual.loss.backward()
    assert_same_step(reference, patched, (expected.loss, actual.loss))


def test_apply_patches_one_instance_once():
    reference, patched = pair("llama")
    forward, head = patched.forward, patched.lm_head.forward
    assert nt.apply(patched) is patched
    assert patched.forward == forward
    assert patched.lm_head.forward == head
    assert "forward" not in reference.__dict__
    assert "forward" not in reference.lm_head.__dict__
    assert reference.loss_function is ForCausalLMLoss
    # Trainer passes num_items_in_batch to forwards that take **kwargs; generate() reads it too
    assert inspect.signature(patched.forward) == inspect.signature(reference.forward)


def test_refuses_a_model_it_cannot_reproduce():
    with pytest.raises(TypeError, match="cannot patch Linear: it is not a transformers"):
        nt.apply(torch.nn.Linear(2, 2))
    config = transformers.BartConfig(vocab_size=50, d_model=16, encoder_layers=1, decoder_layers=1,
                                     encoder_attention_heads=2, decoder_attention_heads=2,
                                     encoder_ffn_dim=16, decoder_ffn_dim=16)  # fmt: skip
    with pytest.raises(TypeError, match="cannot patch BartForCausalLM: its forward does not call"):
        nt.apply(transformers.BartForCausalLM(config))
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL))
    model.loss_function = lambda *args, **kwargs: 0
    with pytest.raises(TypeError, match="cannot patch LlamaForCausalLM: its loss_function"):
        nt.apply(model)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "options",
    [{}, {"num_items_in_batch": torch.tensor(9)}, {"num_items_in_batch": 9.0},
     {"shift_labels": True}, {"ignore_index": 3}],
)  # fmt: skip
def test_causal_lm_loss_is_for_causal_lm_loss(dtype, options):
    generator = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 7, 13, generator=generator).to(dtype)
    labels = torch.randint(0, 13, (2, 7), generator=generator)
    labels[0, 2:4] = options.get("ignore_index", -100)
    options = dict(options)
    if options.get("shift_labels"):
        options["shift_labels"] = torch.roll(labels, 1, dims=1)
    ours, theirs = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    actual = nt.causal_lm_loss(ours, labels, 13, **options)
    expected = ForCausalLMLoss(theirs, labels, 13, **options)
    assert actual.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=0)
    actual.backward()
    expected.backward()
    torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-5, atol=1e-7)


def test_causal_lm_loss_as_the_model_loss_function():
    reference, patched = pair("mistral")
    nt.apply(patched, fused_linear=False)
    ids, mask, labels = batch()
    assert patched.loss_function(reference(ids).logits, labels, VOCAB).shape == ()
    expected = reference(ids, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(patched(ids, attention_mask=mask, labels=labels).loss, expected,
                               rtol=1e-5, atol=0)  # fmt: skip


def test_bfloat16_model_gives_a_float32_loss():
    """transformers upcasts bfloat16 logits to float32; the patched loss is float32 too,
    computed from the hidden states in float32 (more precise than the bfloat16 logits)."""
    reference, patched = pair("llama")
    reference.to(torch.bfloat16)
    patched.to(torch.bfloat16)
    ids, mask, labels = batch()
    expected = reference(ids, attention_mask=mask, labels=labels).loss
    actual = patched(ids, attention_mask=mask, labels=labels).loss
    assert expected.dtype == actual.dtype == torch.float32
    torch.testing.assert_close(actual, expected, rtol=1e-2, atol=0)  # bfloat16 logits' rounding
    actual.backward()
    assert patched.lm_head.weight.grad.dtype == torch.bfloat16

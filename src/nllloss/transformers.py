r"""Hugging Face transformers: the causal-LM loss, and models whose loss never forms the logits.

A transformers causal LM (``LlamaForCausalLM`` and the like) computes its loss in
``forward``: the final hidden states go through ``lm_head`` into (tokens x vocabulary)
logits, which ``self.loss_function`` (``ForCausalLMLoss``) upcasts to float32, compares
with the labels shifted by one, sums and divides. :func:`apply` patches one model so
that, when labels are given, the loss comes from the hidden states and ``lm_head``'s
weight (and bias) through :func:`nllloss.linear_cross_entropy`, a block of rows at a
time: the logits are never formed. :func:`causal_lm_loss` is ``ForCausalLMLoss`` itself,
through nllloss's fused from-logits loss.

Gradient accumulation: with micro-batches of different token counts, each micro-batch's
``'mean'`` is not a share of the whole batch's. Pass ``num_items_in_batch``, the number of
trained tokens of the whole batch *after the shift* (:func:`num_items_in_batch`), and each
micro-batch's loss is its sum divided by it; their gradients add up to the whole batch's.
``transformers.Trainer`` does this by itself for models whose ``forward`` takes
``**kwargs``, which patched models still do.

Importing this module imports torch and transformers; ``import nllloss`` alone does not.
"""

from __future__ import annotations

import ast
import functools
import inspect
import textwrap
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

try:
    import torch
    import transformers
except ModuleNotFoundError as error:
    if error.name not in ("torch", "transformers"):  # there, but something they import is not
        raise
    raise ImportError(
        "nllloss.transformers needs torch and transformers (pip install 'nllloss[transformers]')"
    ) from None

from ._hidden_states import linear_cross_entropy
from ._loss import nll_loss

__all__ = ["apply", "causal_lm_loss", "num_items_in_batch"]

IGNORE_INDEX = -100  # transformers' default label for "no loss here"


def _shifted(labels, ignore_index: int, shift_labels):
    """The target of every position: the next position's label (``ignore_index`` after the
    last), or ``shift_labels`` when given; flattened. As ``ForCausalLMLoss``."""
    if shift_labels is None:
        shift_labels = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    return shift_labels.reshape(-1)


def num_items_in_batch(
    labels: torch.Tensor | Sequence[torch.Tensor],
    *,
    ignore_index: int = IGNORE_INDEX,
    shift_labels: bool = True,
) -> torch.Tensor:
    """The number of tokens a causal LM is trained on: its labels after the shift.

    Position t predicts label t + 1, so the first label of every sequence is never a
    target: a batch of B sequences whose labels hold K values other than ``ignore_index``
    trains on K minus the number of sequences whose first label is not ignored. This is
    the ``num_items_in_batch`` (and the ``total_weight``) of gradient accumulation over
    micro-batches; counting the unshifted labels overcounts by up to one token per
    sequence and scales every gradient down by that much.

    Parameters
    ----------
    labels : tensor or sequence of tensors
        ``(..., T)`` labels, or the labels of every micro-batch (summed).
    ignore_index : int, default -100
        The label that trains nothing.
    shift_labels : bool, default True
        False when the labels are already shifted (``shift_labels=`` of the model).

    Returns
    -------
    tensor
        0-d int64, on the labels' device (never read on the host).

    Examples
    --------
    >>> import torch
    >>> from nllloss.transformers import num_items_in_batch
    >>> labels = torch.tensor([[5, 6, 7, -100], [-100, 8, 9, 10]])
    >>> int((labels != -100).sum()), int(num_items_in_batch(labels))
    (6, 5)
    >>> int(num_items_in_batch([labels, labels[:1]]))
    7
    """
    if isinstance(labels, torch.Tensor):
        labels = [labels]
    counts = [
        ((piece[..., 1:] if shift_labels else piece) != ignore_index).sum() for piece in labels
    ]
    return functools.reduce(torch.add, counts)


def _divided(loss: torch.Tensor, denominator) -> torch.Tensor:
    """``loss / denominator`` as ``ForCausalLMLoss`` divides: a tensor moves to the loss's
    device and is never read on the host."""
    if torch.is_tensor(denominator):
        denominator = denominator.to(loss.device)
    return loss / denominator


def causal_lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    vocab_size: int | None = None,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = IGNORE_INDEX,
    shift_labels: torch.Tensor | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    """transformers' ``ForCausalLMLoss``, through nllloss's fused from-logits loss.

    The logits are upcast to float32; position t of every sequence is scored against
    label t + 1 (the last position against nothing), or against ``shift_labels[t]`` when
    given. The loss is

    .. math:: L = \\frac{1}{D} \\sum_{n: y_n \\ne ii} -\\log \\operatorname{softmax}(z_n)_{y_n}

    with ``D = num_items_in_batch`` when given (a tensor stays on its device), else the
    number of scored positions (NaN when there are none, as in transformers). Usable as
    ``model.loss_function``; other keyword arguments are accepted and ignored, as there.

    Parameters
    ----------
    logits : tensor
        ``(..., T, V)``.
    labels : tensor
        ``(..., T)`` integer labels, ``ignore_index`` where nothing is trained.
    vocab_size : int, optional
        V (default: the logits' last axis).
    num_items_in_batch : tensor or int, optional
        The denominator: the trained tokens of the whole batch (see
        :func:`num_items_in_batch`).
    ignore_index : int, default -100
    shift_labels : tensor, optional
        Labels already shifted, ``(..., T)``; ``labels`` is then not read.

    Returns
    -------
    tensor
        The float32 loss, differentiable with respect to the logits.

    Examples
    --------
    >>> import torch
    >>> from nllloss.transformers import causal_lm_loss
    >>> logits = torch.zeros(1, 3, 4)
    >>> causal_lm_loss(logits, torch.tensor([[0, 1, 2]]), 4)  # log(4): uniform logits
    tensor(1.3863)
    >>> causal_lm_loss(logits, torch.tensor([[0, 1, 2]]), 4, num_items_in_batch=torch.tensor(4))
    tensor(0.6931)
    """
    logits = logits.float()
    target = _shifted(labels, ignore_index, shift_labels).to(logits.device)
    logits = logits.reshape(-1, logits.shape[-1] if vocab_size is None else vocab_size)
    if num_items_in_batch is None:
        return nll_loss(logits, target, ignore_index=ignore_index, from_logits=True)
    summed = nll_loss(logits, target, ignore_index=ignore_index, reduction="sum", from_logits=True)
    return _divided(summed, num_items_in_batch)


# --- Patching a model ---------------------------------------------------------------------

# What a causal LM's forward does to the logits between ``logits = self.lm_head(...)`` and
# its loss, as transformers 5 writes it (source, compared after ``ast`` normalisation),
# mapped to the same operation on the hidden states and bias (a scale, linear in them) and
# the soft-cap ``c`` (``c tanh(z / c)``). A model whose forward does anything else is refused.
_HEADS: dict[str, tuple[Callable | None, Callable]] = {
    # Llama, Mistral, Qwen2/3, Phi, Phi-3 and most others
    "": (None, lambda model: None),
    # Gemma 2, 3, 3n, 4; VaultGemma; NanoChat
    """
if self.config.final_logit_softcapping is not None:
    logits = logits / self.config.final_logit_softcapping
    logits = torch.tanh(logits)
    logits = logits * self.config.final_logit_softcapping
""": (None, lambda model: model.config.final_logit_softcapping),
    # Cohere, Cohere 2
    "logits = logits * self.logit_scale": (
        lambda model, x: x * model.logit_scale,
        lambda model: None,
    ),
    # Granite
    "logits = logits / self.config.logits_scaling": (
        lambda model, x: x / model.config.logits_scaling,
        lambda model: None,
    ),
}
_HEADS = {ast.unparse(ast.parse(textwrap.dedent(source))): rule for source, rule in _HEADS.items()}


@dataclass
class _Pending:
    """One forward with labels, whose loss ``lm_head`` computes from its input."""

    labels: Any
    shift_labels: Any
    num_items_in_batch: Any
    ignore_index: int
    per_token: bool = False  # also keep every position's loss (TRL's fused head)
    loss: Any = None
    token_losses: Any = None
    metrics_inputs: Any = None  # TRL's metrics: (hidden, weight, bias, target, softcap)


@dataclass
class _Patch:
    """What :func:`apply` keeps on a model."""

    fused_linear: bool
    scale: Callable | None
    softcap: Callable
    signature: inspect.Signature
    pending: _Pending | None = field(default=None)
    forward: Any = None  # the bound forward it installed


def _refuse(model, why: str) -> TypeError:
    return TypeError(
        f"nllloss.transformers.apply cannot patch {type(model).__name__}: {why}; it patches "
        "transformers causal LMs (…ForCausalLM) whose forward computes "
        "`logits = self.lm_head(hidden_states)` and `self.loss_function(logits, labels, ...)`"
    )


def _head_rule(model) -> tuple[Callable | None, Callable]:
    """The post-processing rule of the model's forward (``_HEADS``), or a TypeError."""
    if not isinstance(model, transformers.PreTrainedModel):
        raise _refuse(model, "it is not a transformers PreTrainedModel")
    if getattr(model.config, "is_encoder_decoder", False):
        raise _refuse(model, "it is an encoder-decoder model")
    if not isinstance(getattr(model, "lm_head", None), torch.nn.Linear):
        raise _refuse(model, "it has no torch.nn.Linear `lm_head`")
    if model.__dict__.get("_loss_function") is not None or (
        transformers.loss.loss_utils.LOSS_MAPPING.get(getattr(model, "loss_type", None))
        is not transformers.loss.loss_utils.ForCausalLMLoss
    ):
        raise _refuse(model, "its loss_function is not transformers' ForCausalLMLoss")
    try:
        source = inspect.getsource(inspect.unwrap(type(model).forward))
        function = ast.parse(textwrap.dedent(source)).body[0]
    except (OSError, TypeError, SyntaxError, IndexError):
        raise _refuse(model, "the source of its forward cannot be read") from None

    def calls(name):
        return [
            node for node in ast.walk(function)
            if isinstance(node, ast.Call) and ast.unparse(node.func) == name
        ]  # fmt: skip

    if len(calls("self.lm_head")) != 1 or len(calls("self.loss_function")) != 1:
        raise _refuse(model, "its forward does not call lm_head and loss_function once each")
    body = function.body
    head = next(
        (
            i for i, statement in enumerate(body)
            if isinstance(statement, ast.Assign)
            and [ast.unparse(t) for t in statement.targets] == ["logits"]
            and isinstance(statement.value, ast.Call)
            and ast.unparse(statement.value.func) == "self.lm_head"
        ),
        None,
    )  # fmt: skip
    if head is None:
        raise _refuse(model, "its forward does not assign `logits = self.lm_head(...)`")
    post = []
    for statement in body[head + 1 :]:
        names = {node.id for node in ast.walk(statement) if isinstance(node, ast.Name)}
        if names & {"labels", "loss"}:
            break
        post.append(statement)
    rule = _HEADS.get(ast.unparse(ast.Module(body=post, type_ignores=[])))
    if rule is None:
        raise _refuse(model, "its forward transforms the logits in a way nllloss does not know")
    return rule


def _from_hidden(model, patch: _Patch, pending: _Pending, hidden: torch.Tensor) -> None:
    """The loss of a forward with labels, from ``lm_head``'s input: computed in float32 (as
    transformers upcasts the logits), outside autocast, into ``pending``."""
    head = model.lm_head
    weight, bias = head.weight, head.bias
    if hasattr(weight, "full_tensor"):  # FSDP2 shards parameters as DTensors: gather them
        weight = weight.full_tensor()
        bias = None if bias is None else bias.full_tensor()
    target = _shifted(pending.labels, pending.ignore_index, pending.shift_labels)
    with torch.autocast(hidden.device.type, enabled=False):
        hidden = hidden.reshape(-1, hidden.shape[-1]).float()
        weight = weight.float()
        bias = None if bias is None else bias.float()
        if patch.scale is not None:  # a scale of the logits, applied to the N x D side
            hidden = patch.scale(model, hidden)
            bias = None if bias is None else patch.scale(model, bias)
        options = {
            "linear_bias": bias,
            "ignore_index": pending.ignore_index,
            "softcap": patch.softcap(model),
        }
        target = target.to(hidden.device)
        if pending.per_token:
            pending.metrics_inputs = (hidden, weight, bias, target, options["softcap"])
            losses = linear_cross_entropy(hidden, weight, target, reduction="none", **options)
            pending.token_losses = losses
            summed = losses.sum()
        elif pending.num_items_in_batch is not None:
            summed = linear_cross_entropy(hidden, weight, target, reduction="sum", **options)
        else:
            pending.loss = linear_cross_entropy(hidden, weight, target, **options)
            return
    if pending.num_items_in_batch is None:  # per token, no denominator: the mean
        pending.loss = summed / (target != pending.ignore_index).sum().clamp(min=1)
    else:
        pending.loss = _divided(summed, pending.num_items_in_batch)


def apply(model, *, fused_linear: bool = True):
    """Compute the loss of a transformers causal LM with nllloss; patches this instance only.

    Afterwards ``model(input_ids, attention_mask=..., labels=..., [num_items_in_batch=...],
    [shift_labels=...])`` returns the loss of the unpatched model (the same
    ``ForCausalLMLoss``: labels shifted by one, ``-100`` ignored, the sum divided by
    ``num_items_in_batch`` when given, else the mean), and the same gradients. With
    ``fused_linear=True`` it is computed from the final hidden states (``lm_head``'s
    input) and ``lm_head``'s weight and bias by :func:`nllloss.linear_cross_entropy`, in
    float32, without forming the logits: ``output.logits`` is then None. What the forward
    does to the logits is done too: Gemma 2's ``final_logit_softcapping`` becomes the
    loss's ``softcap``, Cohere's ``logit_scale`` and Granite's ``logits_scaling`` scale
    the hidden states (not the vocabulary matrix). Tied embeddings, ``logits_to_keep``
    and padding need nothing. With ``fused_linear=False`` the logits are formed and the
    loss is :func:`causal_lm_loss`. Without labels the outputs are the unpatched model's,
    so ``generate()`` is unchanged.

    The forward keeps its signature (``**kwargs`` included, so ``transformers.Trainer``
    passes ``num_items_in_batch``). Calling ``apply`` again only changes
    ``fused_linear``; other instances of the class are untouched. A model patched this
    way also answers TRL's fused-head call (``model(..., fused_lm_head=True)``, which
    ``trl.SFTTrainer`` makes) with nllloss's per-token losses: call ``apply`` on
    ``trainer.model`` after constructing the trainer.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        A causal LM whose forward computes ``logits = self.lm_head(hidden_states)`` and
        then ``self.loss_function(logits, labels, ...)``, with a post-processing of the
        logits nllloss knows (none, soft-capping, a scale).
    fused_linear : bool, default True
        Compute the loss from the hidden states (True) or from the logits (False).

    Returns
    -------
    model
        The same object.

    Raises
    ------
    TypeError
        For a model this cannot reproduce (named, with the reason).

    Examples
    --------
    >>> import torch, transformers, nllloss.transformers
    >>> config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
    ...     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)
    >>> _ = torch.manual_seed(0)
    >>> model = nllloss.transformers.apply(transformers.LlamaForCausalLM(config))
    >>> ids = torch.randint(0, 64, (2, 8))
    >>> out = model(ids, labels=ids)
    >>> out.logits is None, out.loss.shape
    (True, torch.Size([]))
    """
    patch = model.__dict__.get("_nllloss_patch")
    if patch is None:
        scale, softcap = _head_rule(model)
        patch = _Patch(bool(fused_linear), scale, softcap, inspect.signature(type(model).forward))
        _patch_head(model, patch)
    patch.fused_linear = bool(fused_linear)
    forward = model.__dict__.get("forward")
    if forward is None or forward is not patch.forward:  # not yet, or wrapped since (TRL)
        patch.forward = types.MethodType(_patched_forward(patch, model.forward), model)
        model.forward = patch.forward
    return model


def _patched_forward(patch: _Patch, inner_forward):
    """The forward of a patched model, around ``inner_forward`` (the class's, or the forward
    that wrapped an earlier patch)."""

    # generate() and Trainer read the signature: the class's, through __wrapped__
    @functools.wraps(getattr(inner_forward, "__func__", inner_forward))
    def forward(self, *args, **kwargs):
        fused_lm_head = kwargs.pop("fused_lm_head", False)
        if patch.pending is not None:  # inside an outer patched forward: it computes the loss
            return inner_forward(*args, **kwargs)
        bound = patch.signature.bind_partial(self, *args, **kwargs).arguments
        extra = next(
            (bound[p.name] for p in patch.signature.parameters.values()
             if p.kind is inspect.Parameter.VAR_KEYWORD and p.name in bound),
            {},
        )  # fmt: skip
        labels, shift_labels = bound.get("labels"), extra.get("shift_labels")
        if not fused_lm_head and (not patch.fused_linear or labels is None):
            return inner_forward(*args, **kwargs)  # the logits, and transformers' rules
        if labels is None and shift_labels is None:
            raise ValueError("fused_lm_head=True needs labels or shift_labels")
        pending = _Pending(
            labels, shift_labels, extra.get("num_items_in_batch"),
            extra.get("ignore_index", IGNORE_INDEX), per_token=bool(fused_lm_head),
        )  # fmt: skip
        if labels is None:  # TRL scores shift_labels alone; the forward needs labels
            kwargs["labels"] = shift_labels
        return_dict = kwargs.pop("return_dict", None)
        patch.pending = pending
        try:
            output = inner_forward(*args, return_dict=True, **kwargs)
        finally:
            patch.pending = None
        if fused_lm_head:
            return _trl_output(pending, output)
        output = type(output)(**{k: v for k, v in output.items() if k != "logits"})
        if return_dict is False or (return_dict is None and not self.config.return_dict):
            return output.to_tuple()
        return output

    return forward


def _patch_head(model, patch: _Patch) -> None:
    """``lm_head`` computes the pending loss from its input instead of the logits, and
    ``loss_function`` returns it (or :func:`causal_lm_loss` of the logits, with none)."""
    inner_head = model.lm_head.forward

    def head_forward(self, input):
        pending = patch.pending
        if pending is None or pending.loss is not None:
            return inner_head(input)
        _from_hidden(model, patch, pending, input)
        # The forward's own post-processing runs on this instead of the logits: nothing
        return input.new_empty((*input.shape[:-1], 0))

    def loss_function(logits, labels, *args, **kwargs):
        pending = patch.pending
        if pending is None:
            return causal_lm_loss(logits, labels, *args, **kwargs)
        if pending.loss is None:
            raise RuntimeError(f"{type(model).__name__}'s lm_head was not called before its loss")
        return pending.loss

    model.lm_head.forward = types.MethodType(head_forward, model.lm_head)
    model.loss_function = loss_function
    model.__dict__["_nllloss_patch"] = patch


def _trl_output(pending: _Pending, output):
    """TRL's ``FusedCausalLMOutput`` of a forward with ``fused_lm_head=True``: the loss and
    every position's log-probability of its label from nllloss (0 where ignored), the
    entropy and whether the label is the most likely token (without gradient)."""
    from trl.trainer.utils import FusedCausalLMOutput

    hidden, weight, bias, target, softcap = pending.metrics_inputs
    labels = pending.labels if pending.shift_labels is None else pending.shift_labels
    mask = target != pending.ignore_index
    entropy, is_top1 = _entropy_and_top1(hidden, weight, bias, target, mask, softcap)

    def positions(values):  # per position, in TRL's shape: (B, T - 1) for unshifted labels
        values = values.reshape(labels.shape)
        return values[..., :-1] if pending.shift_labels is None else values

    return FusedCausalLMOutput(
        loss=pending.loss,
        log_probs=positions(-pending.token_losses),
        entropy=positions(entropy),
        is_top1=positions(is_top1),
        label_mask=positions(mask),
        aux_loss=getattr(output, "aux_loss", None),
    )


@torch.no_grad()
def _entropy_and_top1(hidden, weight, bias, target, mask, softcap):
    """Each row's entropy ``lse - sum p z`` and ``argmax z == target`` (zero where the target
    is ignored), a block of rows at a time, without gradient: TRL's training metrics."""
    from ._hidden_states.blocks import chunk_rows_for

    rows = int(hidden.shape[0])
    step = chunk_rows_for(rows)
    entropy = hidden.new_zeros(rows)
    top1 = torch.zeros(rows, dtype=torch.bool, device=hidden.device)
    for start in range(0, rows, step):
        block = slice(start, start + step)
        logits = torch.nn.functional.linear(hidden[block], weight, bias)
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        log_p = logits.log_softmax(-1)
        entropy[block] = -(log_p.exp() * log_p).sum(-1)
        top1[block] = logits.argmax(-1) == target[block]
    return entropy * mask, top1 & mask

"""torch tensors for the per-token statistics (``nllloss._token_stats``): routes and autograd.

A call's engine (:func:`engine_for`): the numba row kernel on zero-copy NumPy views for
(N, C) and unbatched CPU tensors (bfloat16 as its bits), the Triton kernels for CUDA
tensors they support, else the generic composition of torch operations. Under
``torch.func`` transforms, forward-mode AD and ``torch.compile`` the statistics are the
generic composition, which each of them differentiates and traces. Otherwise an
``autograd.Function`` runs the engine: the forward keeps the input and target
(``save_for_backward``) and each row's ``(m, log s, u / s)``; the backward is one more pass
over the input. A backward that builds a graph (``create_graph=True``, double backward)
differentiates the generic composition instead. Imported only when torch tensors arrive.
"""

from __future__ import annotations

import array_api_compat.torch as torch_namespace
import numpy as np
import torch
import torch.autograd.forward_ad as _forward_ad

from .. import _token_stats
from .._hidden_states import blocks
from .._hidden_states import torch as hidden_states_torch
from .._kernels import triton
from .._problem import layout_of
from .._token_stats import NumbaEngine, Stats, TokenStats, Upstream

GENERIC = _token_stats.generic_engine(torch_namespace)
_ON_NUMPY = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def engine_for(stats: Stats):
    """The engine of a call on torch tensors (see the module)."""
    x = stats.problem.input
    if (
        x.device.type == "cpu"
        and x.dtype in _ON_NUMPY
        and _token_stats.numba_available()
        and NumbaEngine.supports(stats)
    ):
        return ON_NUMPY
    triton_engine = _triton_engine(stats)
    return GENERIC if triton_engine is None else triton_engine


def _triton_engine(stats: Stats):
    """The Triton engine when the kernels serve the call's tensors (CUDA tensors when
    enabled, CPU tensors under the interpreter switch) and it supports the call."""
    x = stats.problem.input
    device = x.device.type
    if not ((device == "cuda" and triton.enabled()) or (device == "cpu" and triton.interpreted())):
        return None
    if triton.load() is None:  # no Triton
        return None
    from .._kernels.triton import _stats as triton_stats

    return triton_stats.ENGINE if triton_stats.ENGINE.supports(stats) else None


class OnNumpy:
    """The numba engine on NumPy views of CPU tensors; results are tensors."""

    @staticmethod
    def _numpy(stats: Stats):
        """The call on NumPy views, and the bits of a bfloat16 input (else None)."""
        problem = stats.problem
        x = problem.input.detach()
        bits = None
        if x.dtype == torch.bfloat16:
            bits = (x.view(torch.int16).numpy(), "bfloat16")
            values = bits[0]
        else:
            values = x.numpy()
        viewed = problem.replace(input=values, target=_numpy_target(problem.target))
        return Stats(viewed, stats.temperature), bits

    @staticmethod
    def forward(stats: Stats):
        viewed, bits = OnNumpy._numpy(stats)
        result, saved = NumbaEngine.forward(viewed, bits)
        return _as_tensors(result, stats.problem.input.dtype), torch.from_numpy(saved)

    @staticmethod
    def backward(stats: Stats, saved, upstream: Upstream):
        viewed, bits = OnNumpy._numpy(stats)
        grad = NumbaEngine.backward(viewed, saved.numpy(), _numpy_upstream(upstream), bits)
        return _gradient_tensor(grad, stats.problem.input)

    @staticmethod
    def forward_backward(stats: Stats, upstream: Upstream, out=None):
        """``out``: a tensor of the compute dtype to write the gradient into (the block's
        logits of ``linear_token_stats``)."""
        viewed, bits = OnNumpy._numpy(stats)
        grad_out = (
            None if out is None else out.detach().numpy().reshape(viewed.problem.layout.batch, -1)
        )
        result, grad = NumbaEngine.forward_backward(
            viewed, _numpy_upstream(upstream), bits, out=grad_out
        )
        if out is not None:
            return _as_tensors(result, stats.problem.input.dtype), out
        return _as_tensors(result, stats.problem.input.dtype), _gradient_tensor(
            grad, stats.problem.input
        )


ON_NUMPY = OnNumpy()


def _numpy_target(target: torch.Tensor) -> np.ndarray:
    return target.detach().numpy()


def _numpy_upstream(upstream: Upstream) -> Upstream:
    return Upstream(
        *(None if a is None else a.detach().to(torch.float64).numpy() for a in upstream)
    )


def _as_tensors(result: TokenStats, dtype) -> TokenStats:
    def tensor(a):  # the kernel's fresh arrays, shared with torch (0-d ones too)
        return torch.from_numpy(np.asarray(a))

    return TokenStats(
        tensor(result.logprob).to(dtype), tensor(result.entropy).to(dtype),
        tensor(result.lse).to(dtype), tensor(result.argmax),
    )  # fmt: skip


def _gradient_tensor(grad: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(grad).reshape(like.shape).to(like.dtype)


# --- From logits ----------------------------------------------------------------------------


def _transformed() -> bool:
    """``torch.func`` transforms and forward-mode AD: plain torch operations only."""
    return torch._C._are_functorch_transforms_active() or _forward_ad._current_level >= 0


def token_stats(stats: Stats) -> TokenStats:
    """The statistics, differentiable with respect to the input: the custom operator
    ``nllloss::token_stats`` (eager and under ``torch.compile``, where it is opaque and
    its target check runs inside), or the composition under transforms."""
    if _transformed():
        return GENERIC.forward(stats)[0]
    problem = stats.problem
    result = token_stats_op(
        problem.input, problem.target, problem.ignore_index, stats.temperature, problem.softcap
    )
    return TokenStats(*result[:4])


def token_stats_with_gradient(stats: Stats, upstream: Upstream):
    """(statistics, gradient with respect to the input) for the upstream gradients."""
    with torch.no_grad():
        return engine_for(stats).forward_backward(stats, upstream)


def _stats_of(input, target, ignore_index, temperature, softcap, check_targets=True) -> Stats:
    """A call from an operator's arguments (validated when the operator was called)."""
    layout = layout_of(tuple(input.shape))
    problem = _token_stats.logits_problem(
        input, target, layout, ignore_index, softcap, check_targets
    )
    return Stats(problem, temperature)


@torch.library.custom_op("nllloss::token_stats", mutates_args=())
def token_stats_op(
    input: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int,
    temperature: float,
    softcap: float | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logprob, entropy, lse, argmax, saved): ``saved`` is what the backward reads
    besides the input, (M, 3) float64 (unused by the generic engine)."""
    stats = _stats_of(input, target, ignore_index, temperature, softcap)
    engine = engine_for(stats)
    result, saved = engine.forward(stats)
    if saved is None:
        saved = input.new_empty((stats.problem.layout.size, 3), dtype=torch.float64)
    return (*result, saved)


@token_stats_op.register_fake
def _(input, target, ignore_index, temperature, softcap):
    shape = layout_of(tuple(input.shape))
    values = input.new_empty(shape.output_shape)
    return (
        values, torch.empty_like(values), torch.empty_like(values),
        input.new_empty(shape.output_shape, dtype=torch.int64),
        input.new_empty((shape.size, 3), dtype=torch.float64),
    )  # fmt: skip


@torch.library.custom_op("nllloss::token_stats_backward", mutates_args=())
def token_stats_backward_op(
    input: torch.Tensor,
    target: torch.Tensor,
    saved: torch.Tensor,
    grad_logprob: torch.Tensor | None,
    grad_entropy: torch.Tensor | None,
    grad_lse: torch.Tensor | None,
    ignore_index: int,
    temperature: float,
    softcap: float | None,
) -> torch.Tensor:
    """The gradient with respect to the input (the targets were checked by the forward)."""
    stats = _stats_of(input, target, ignore_index, temperature, softcap, check_targets=False)
    upstream = Upstream(grad_logprob, grad_entropy, grad_lse)
    return engine_for(stats).backward(stats, saved, upstream)


@token_stats_backward_op.register_fake
def _(input, *rest):
    return torch.empty_like(input)


def _setup(ctx, inputs, output):
    input, target, ignore_index, temperature, softcap = inputs
    ctx.save_for_backward(input, target, output[4])
    ctx.settings = (ignore_index, temperature, softcap)
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_logprob, grad_entropy, grad_lse, _grad_argmax, _grad_saved):
    input, target, saved = ctx.saved_tensors
    upstream = Upstream(grad_logprob, grad_entropy, grad_lse)
    none = (None,) * 4
    if all(a is None for a in upstream):
        return None, *none
    if torch.is_grad_enabled():  # a graph to build (double backward): the composition
        stats = _stats_of(input, target, *ctx.settings, check_targets=False)
        return _composed_gradient(lambda: GENERIC.forward(stats)[0], (input,), upstream)[0], *none
    return token_stats_backward_op(input, target, saved, *upstream, *ctx.settings), *none


token_stats_op.register_autograd(_backward, setup_context=_setup)


def _composed_gradient(compose, inputs, upstream: Upstream):
    """The gradients with respect to ``inputs`` of the statistics ``compose()`` makes of
    plain torch operations, with a graph of their own (for a double backward)."""
    with torch.enable_grad():
        pairs = [(r, g) for r, g in zip(compose()[:3], upstream, strict=True) if g is not None]
        return torch.autograd.grad(
            [r for r, _ in pairs], inputs, [g for _, g in pairs],
            create_graph=True, allow_unused=True, materialize_grads=True,
        )  # fmt: skip


# --- From hidden states -----------------------------------------------------------------------


def linear_token_stats(linear: blocks.Linear, temperature: float) -> TokenStats:
    """The statistics of the linear layer's logits, differentiable with respect to the
    input, weight and bias."""
    arguments = (linear.input, linear.linear_weight, linear.linear_bias)
    if _transformed() or torch.compiler.is_compiling():
        return _composed(linear, temperature)
    if torch.is_grad_enabled() and any(a is not None and a.requires_grad for a in arguments):
        return TokenStats(*_LinearStats.apply(*arguments, linear, temperature))
    with torch.no_grad():
        return _blocks(linear, temperature)[0]


def _blocks(linear, temperature, upstream=None, wants=(True, True, True)):
    """``_token_stats.run_blocks``, the statistics in the input's dtype."""
    result, *grads = _token_stats.run_blocks(linear, temperature, upstream, wants)
    return _token_stats.in_input_dtype(linear, result), *grads


def linear_token_stats_and_grad(linear, temperature, upstream: Upstream, wants):
    with torch.no_grad():
        return _blocks(linear, temperature, upstream, wants)


def _composed(linear: blocks.Linear, temperature: float) -> TokenStats:
    """``token_stats(linear(input, W, b))`` in plain torch operations (forms the logits)."""
    logits = torch.nn.functional.linear(linear.hidden, linear.weight, linear.bias)
    problem = linear.problem
    stats = Stats(problem.replace(input=logits.reshape(problem.layout.input_shape)), temperature)
    return _token_stats.in_input_dtype(linear, GENERIC.forward(stats)[0])


class _LinearStats(torch.autograd.Function):
    """The statistics of the blocks; the backward makes the blocks again with the
    upstream gradients."""

    @staticmethod
    def forward(ctx, input, linear_weight, linear_bias, linear, temperature):
        result = _blocks(linear, temperature)[0]
        ctx.save_for_backward(input, linear_weight, linear_bias, linear.problem.target)
        ctx.linear = _without_tensors(linear)
        ctx.temperature = temperature
        ctx.mark_non_differentiable(result.argmax)
        ctx.set_materialize_grads(False)
        return tuple(result)

    @staticmethod
    def backward(ctx, grad_logprob, grad_entropy, grad_lse, _grad_argmax):
        input, linear_weight, linear_bias, target = ctx.saved_tensors
        template = ctx.linear
        problem = template.problem.replace(input=input, target=target)
        backend = _token_stats.backend_for(input)
        linear = blocks.assemble(backend, problem, input, linear_weight, linear_bias,
                                 template.chunk_rows, None,
                                 hidden_states_torch.ALGEBRA)  # fmt: skip
        upstream = Upstream(grad_logprob, grad_entropy, grad_lse)
        if all(a is None for a in upstream):
            return None, None, None, None, None
        wants = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():  # a graph to build: differentiate the composition
            arguments = tuple(a for a in (input, linear_weight, linear_bias) if a is not None)
            grads = _composed_gradient(
                lambda: _composed(linear, ctx.temperature), arguments, upstream
            )
            grads = list(grads) + [None] * (3 - len(grads))
            return (*grads, None, None)
        _, *grads = _blocks(linear, ctx.temperature, upstream, wants)
        return (*grads, None, None)


def _without_tensors(linear: blocks.Linear) -> blocks.Linear:
    """The call's settings without its tensors (kept by ``save_for_backward``)."""
    import dataclasses

    return dataclasses.replace(
        linear, problem=linear.problem.replace(input=None, target=None), hidden=None,
        weight=None, bias=None, input=None, linear_weight=None, linear_bias=None,
    )  # fmt: skip

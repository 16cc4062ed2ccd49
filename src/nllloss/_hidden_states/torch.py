"""torch tensors for the loss from hidden states (``nllloss._hidden_states``): the blocks'
matrix products in torch, and the loss as a differentiable torch function.

The blocks run as for NumPy (``blocks.run``), with ``torch.matmul``/``addmm_`` into
preallocated tensors, each block on torch's threads or on one thread, whichever has lately
been faster (``TorchAlgebra.threads``); each block's loss and gradient take the torch route
of ``nll_loss`` (NumPy's kernels on zero-copy views for CPU tensors, the Triton or generic
path on CUDA).

Autograd: :class:`_Blocks` through ``nllloss._torch.autograd.FusedLoss``: for 'mean' and 'sum' the
forward computes the gradients too, for an upstream gradient of 1, and the backward scales
them (the three products and the one pass over the logits, once). For 'none' the upstream
gradient differs per row: the backward recomputes the blocks with it. A second backward
(``retain_graph=True``) recomputes too; one that builds a graph (``create_graph=True``)
differentiates the composition. Under ``torch.func`` transforms and ``torch.compile``,
where an ``autograd.Function`` with state does not compose, and for probability targets
that require grad, the loss is the plain composition ``nll_loss(linear(...))``, which forms
the logits. Imported only when torch tensors arrive.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass

import torch

from .._kernels.cpu._threads import Pace
from .._torch.autograd import FusedLoss, differentiated
from .._torch.engines import composed, without_autocast
from . import blocks

# Threads or one thread, per size class of a block's work and whether it computes gradients
_paces: dict[tuple[int, bool], Pace] = {}


class TorchAlgebra:
    """torch: every product into a preallocated tensor."""

    @staticmethod
    def accumulation_dtype(linear):
        return torch.float64

    @staticmethod
    @contextlib.contextmanager
    def threads(linear, rows: slice, gradients: bool):
        """Run a block on torch's threads or on one thread, whichever has lately been
        faster for blocks of its size (``_kernels.cpu._threads.Pace``, as the kernels choose).

        Each of a block's products is a parallel region of torch's OpenMP runtime, whose
        idle workers spin (GNU OpenMP in torch's CPU wheels, 300,000 spins) and are then
        the last to get a core back when the block's loss pass (numba's threads) or another
        process wants the cores. Measured on 2 cores shared with other jobs (load average
        7-8), at 2048 x 64 x 32000, float32: a training step's blocks took 23-33 ms of CPU
        time more per block on torch's 2 threads than on one (0.90-1.03 s against 0.54 s
        at 128 rows, 1.5 s against 0.55 s at 64) and 2.0-3.1 s of wall time against
        1.65-1.7 s; with ``OMP_WAIT_POLICY=PASSIVE`` for the whole process the 2 threads
        took 1.14 s, as one. The products give the same bits on any thread count, so the
        choice changes the time only. While one thread runs a block, torch's thread count
        is 1 for the whole process (``torch.set_num_threads``), and restored after it.
        """
        threads = torch.get_num_threads()
        if threads == 1 or linear.hidden.device.type != "cpu":
            yield
            return
        work = (rows.stop - rows.start) * linear.outputs * int(linear.hidden.shape[-1])
        pace = _paces.setdefault((work.bit_length(), gradients), Pace())
        parallel = pace.use_threads()
        if not parallel:
            torch.set_num_threads(1)
        start = time.perf_counter()
        try:
            yield
        finally:
            if not parallel:
                torch.set_num_threads(threads)
        pace.record(parallel, (time.perf_counter() - start) / max(work, 1))

    @staticmethod
    def buffer(linear):
        w = linear.weight
        return w.new_empty((min(linear.chunk_rows, linear.rows), linear.outputs))

    @staticmethod
    def logits(linear, hidden, buffer):
        logits = buffer[: hidden.shape[0]]
        if linear.bias is None:
            return torch.matmul(hidden, linear.weight.T, out=logits)
        return torch.addmm(linear.bias, hidden, linear.weight.T, out=logits)

    @staticmethod
    def gradients(linear, wants, out):
        w, h = linear.weight, linear.hidden
        return (
            h.new_empty(h.shape) if wants[0] else None,
            torch.zeros_like(w) if wants[1] else None,
            torch.zeros_like(linear.bias) if linear.bias is not None and wants[2] else None,
        )

    @staticmethod
    def add(linear, grads, rows, grad, hidden):
        d_input, d_weight, d_bias = grads
        if d_weight is not None:
            d_weight.addmm_(grad.T, hidden)
        if d_bias is not None:
            d_bias += grad.sum(0)
        if d_input is not None:
            torch.matmul(grad, linear.weight, out=d_input[rows])
        return grads

    @staticmethod
    def finish(linear, grads):
        likes = (linear.input, linear.linear_weight, linear.linear_bias)
        return tuple(
            None if g is None else g.reshape(like.shape).to(like.dtype)
            for g, like in zip(grads, likes, strict=True)
        )


ALGEBRA = TorchAlgebra()


def loss(linear: blocks.Linear):
    """The loss, differentiable with respect to the input, weight and bias; with
    ``return_stats`` a ``LossAndStats`` whose statistics carry no gradient."""
    if composed(linear.problem) or torch.compiler.is_compiling():
        return _composed(linear, linear.problem.return_stats)
    computation = _Blocks(linear)
    arguments = computation.arguments
    if torch.is_grad_enabled() and any(a is not None and a.requires_grad for a in arguments):
        result = FusedLoss.apply(computation, *arguments)
        if linear.problem.return_stats:  # the forward's statistics, kept by the computation
            from .._token_stats import LossAndStats

            return LossAndStats(result, computation.stats[0])
        return result
    with torch.no_grad():
        return blocks.run(linear)[0]


def _composed(linear: blocks.Linear, with_stats: bool = False):
    """The loss of the whole logits ``linear(input, W, b)``, formed by plain torch operations
    in the compute dtype (autocast would make the product 16-bit), through the backend;
    ``with_stats``: with the statistics of the logits (without a gradient)."""
    problem = linear.problem.replace(return_stats=False)
    with without_autocast(linear.hidden.device.type):
        logits = torch.nn.functional.linear(linear.hidden, linear.weight, linear.bias)
    logits = logits.reshape(problem.layout.input_shape)
    result = linear.backend.forward(problem.replace(input=logits)).to(linear.input.dtype)
    if not with_stats:
        return result
    from .. import _token_stats

    statistics = _token_stats.apart(linear)[1]
    logits_stats = _token_stats.Stats(statistics.problem.replace(input=logits.detach()))
    with torch.no_grad():
        values = _token_stats.compute(logits_stats, linear.backend)
    return _token_stats.LossAndStats(result, _token_stats.joined(linear, [values]))


@dataclass(frozen=True)
class _Blocks:
    """The loss in blocks of rows (``blocks.run``), for ``FusedLoss`` (see the module)."""

    linear: blocks.Linear
    # with return_stats: the statistics of the forward's blocks (not kept for the backward)
    stats: list = dataclasses.field(default_factory=list, compare=False)

    @property
    def arguments(self) -> tuple:
        linear = self.linear
        return (linear.input, linear.linear_weight, linear.linear_bias)

    def forward(self, wants):
        linear = self.linear
        if linear.problem.elementwise:
            return self._loss(blocks.run(linear)[0]), None
        one = torch.ones((), dtype=linear.hidden.dtype, device=linear.hidden.device)
        loss, *unit = blocks.run(linear, one, wants)
        return self._loss(loss), tuple(unit)

    def _loss(self, result):
        """The loss of a run; with ``return_stats`` its statistics kept in ``stats``."""
        if not self.linear.problem.return_stats:
            return result
        self.stats.append(result.stats)
        return result.loss

    def gradients(self, grad, wants):
        return tuple(blocks.run(self.linear, grad, wants)[1:])

    def differentiable_gradients(self, grad, wants):
        return differentiated(_composed(self.linear), self.arguments, grad, wants)

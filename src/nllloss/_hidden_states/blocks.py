r"""The loss from hidden states: ``cross_entropy(linear(input, W, b), target)``, chunked.

For a language model's head the logits are the memory: ``input @ W.T`` is N x C. Here they
are made a block of rows at a time, and each block goes through the loss of its rows at
once::

    for each block of R rows r (R from ``chunk_rows_for``):
        logits = input[r] @ W.T + b                          GEMM 1, (R, C)
        loss[r], G = the fused from-logits loss and gradient  one pass over the block,
                     of the block (``Problem``, the backend's  G written over the logits
                     ``forward_backward``)
        dW += G.T @ input[r] ;  db += sum_rows G              GEMM 3
        d_input[r] = G @ W                                    GEMM 2

So the only large work is the three GEMMs and one pass over each block; nothing of size
N x C exists, only one (R, C) block. The loss of a block is that of the whole logits
restricted to its rows, with every option of ``nll_loss`` (weights, ``ignore_index``,
label smoothing, probability targets, ``z_loss``, ``softcap``): for ``'mean'`` the blocks
are divided by the denominator of the whole batch (``total_weight`` of the whole target,
computed first), so that their losses and gradients add up to the whole's. The row kernels
are the existing ones (``nllloss._kernels.cpu``, the torch route, the generic path); this module
only cuts rows and multiplies matrices.

float16 and bfloat16 compute in float32 (the hidden states and weights are cast once; the
gradients accumulate in float32 and are rounded once). Blocks are visited in order and
each GEMM's summation order is fixed by the library, so results do not depend on thread
counts; other block sizes agree to rounding.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any

import array_api_compat
import numpy as np

from .. import _generic
from .._problem import Problem, layout_of

# Rows per block. Each block streams the whole weight twice (for its logits and its input's
# gradient) and the weight's gradient in and out once, whatever its rows, while its own work
# grows with its rows; both grow with V x D, so their ratio depends on the rows alone: the
# floor is in rows, not bytes. Measured as one thread's CPU time (so that other jobs on the
# 2 shared cores do not count), float32, NumPy at (2048, 512, 32000): the three products
# of 64-row blocks took 21% more than the full-size ones, of 128 rows 12%, of 256 rows 6%
# (the weight's gradient most: its product has only the block's rows to sum over). At
# hidden size 64 (the Hugging Face benchmark's model) torch's blocks cost the same from 64
# rows up, NumPy's gradient products 26% more than at full size with 128 rows, 7% with
# 256 (benchmarks/linear.py --profile). Hence at least MIN_CHUNK_ROWS...
MIN_CHUNK_ROWS = 128
# ...and at most MAX_CHUNK_ROWS (512 rows cost 6.5% more than the full-size products, as 256
# did, at twice the memory)...
MAX_CHUNK_ROWS = 256
# ...and between them, as many rows as keep the block of logits (the memory beyond the
# arguments and results) within this share of the whole logits: 5% with the rest of the
# call's scratch. Below MIN_CHUNK_ROWS / LOGITS_SHARE rows the floor wins: the Hugging Face
# step at 2048 tokens, V = 32000, needed 7.7% of the logits beyond the model body's step
# with 128 rows (the block and the weight's gradient), 13% with 192
# (benchmarks/transformers_step.py's memory measurement).
LOGITS_SHARE = 0.04


def chunk_rows_for(rows: int) -> int:
    """Rows per block of a batch of ``rows``: ``LOGITS_SHARE`` of them, within
    ``MIN_CHUNK_ROWS`` and ``MAX_CHUNK_ROWS``, at most every row (and at least 1).

    The block's share of the logits is that of its rows whatever the vocabulary; below
    ``MIN_CHUNK_ROWS / LOGITS_SHARE`` rows (3200) the floor wins, and the block is a
    larger share (6.25% at 2048 rows).
    """
    share = int(rows * LOGITS_SHARE)
    return max(1, min(rows, max(MIN_CHUNK_ROWS, min(MAX_CHUNK_ROWS, share))))


@dataclass(frozen=True)
class Linear:
    """One call of the loss from hidden states, validated.

    ``problem`` is the loss of the whole logits (its ``input`` the hidden states: only the
    logits' shape is used). ``hidden`` is ``(rows, D)``, ``weight`` ``(C * d1 ... dK, D)``,
    ``bias`` ``(C * d1 ... dK,)`` or None, all in the compute dtype; ``denominator`` is
    the 'mean' denominator each block is divided by (None for 'sum' and 'none').
    """

    backend: Any
    problem: Problem
    hidden: Any
    weight: Any
    bias: Any | None
    input: Any  # the arrays as given: the gradients take their shapes and dtypes
    linear_weight: Any
    linear_bias: Any | None
    chunk_rows: int
    denominator: Any | None
    algebra: Any  # the matrix products (``nllloss._hidden_states.algebra_for``)

    @property
    def xp(self):
        return self.backend.xp

    @property
    def rows(self) -> int:
        return int(self.hidden.shape[0])

    @property
    def outputs(self) -> int:
        """Logits per row: C * d1 * ... * dK."""
        return int(self.weight.shape[0])

    def blocks(self) -> list[slice]:
        """The blocks of rows, in order; one empty block for an empty batch (so that its
        loss is the backend's: NaN for 'mean', 0 for 'sum')."""
        step = self.chunk_rows
        return [slice(s, min(s + step, self.rows)) for s in range(0, self.rows, step)] or [
            slice(0, 0)
        ]

    def block_arrays(self, rows: slice):
        """What the block ``rows`` cuts from the problem: ``(target, {name: array})``, its
        target and its ``per_element`` options (the whole of them for an unbatched input)."""
        problem = self.problem

        def cut(array):
            return array if problem.layout.unbatched else array[rows, ...]

        return cut(problem.target), problem.options.per_element(cut)

    def block_problem(self, logits, arrays) -> Problem:
        """The loss of a block of the logits (``logits``, 2-D) against its ``arrays``
        (``block_arrays``); 'mean' divides by the whole batch's denominator."""
        problem = self.problem
        if problem.layout.unbatched:  # one row: the whole problem
            shape = problem.layout.input_shape
        else:
            shape = (int(logits.shape[0]), *problem.layout.input_shape[1:])
        target, per_element = arrays
        return problem.replace(
            input=self.xp.reshape(logits, shape),
            target=target,
            layout=layout_of(shape),
            total_weight=self.denominator,
            **per_element,
        )

    def upstream_rows(self, upstream, rows: slice):
        """The upstream gradient of the block: its rows for 'none', else the scalar."""
        return upstream[rows, ...] if self.problem.elementwise else upstream


def assemble(
    backend, problem, input, linear_weight, linear_bias, chunk_rows, denominator, algebra
) -> Linear:
    """The :class:`Linear` of validated arguments: the hidden states and weights as 2-D
    arrays in the compute dtype (float32 for 16-bit ones, with the problem's weight and
    probabilities), and the rows per block (``chunk_rows`` or the rule's)."""
    xp = backend.xp
    dtype = xp.float32 if problem.computes_in_float32 else input.dtype
    if problem.computes_in_float32:  # the blocks' logits are float32: so are these
        problem = problem.replace(
            weight=None if problem.weight is None else xp.astype(problem.weight, dtype),
            target=xp.astype(problem.target, dtype) if problem.probabilities else problem.target,
        )
    features = int(input.shape[-1])
    outputs = math.prod(linear_weight.shape[:-1])
    rows = int(input.shape[0]) if input.ndim == 2 else 1

    def flat(array, shape):
        return None if array is None else xp.reshape(xp.astype(array, dtype, copy=False), shape)

    return Linear(
        backend=backend,
        problem=problem,
        hidden=flat(input, (rows, features)),
        weight=flat(linear_weight, (outputs, features)),
        bias=flat(linear_bias, (outputs,)),
        input=input,
        linear_weight=linear_weight,
        linear_bias=linear_bias,
        chunk_rows=chunk_rows or chunk_rows_for(rows),
        denominator=denominator,
        algebra=algebra,
    )


def check_targets(backend, problem: Problem) -> None:
    """The IndexError of the first bad target, at its place in the whole target (a block
    would name its place in the block). Hidden values (traced, lazy) are left to the
    blocks, where a bad target gives NaN as in ``nll_loss``."""
    if problem.probabilities:
        return
    xp, layout = backend.xp, problem.layout
    target = xp.reshape(problem.target, (1,) if layout.unbatched else layout.output_shape)
    _generic.checked_valid(xp, target, layout, problem.ignore_index)


def denominator_of(backend, problem: Problem):
    """What every block's 'mean' divides by: the whole batch's (``Problem.denominator``),
    as an array; None for 'sum' and 'none'."""
    if problem.reduction != "mean":
        return None

    def whole():
        return backend.total_weight(problem.target, problem.weight, problem.ignore_index)

    denominator = problem.denominator(whole, whole)
    if isinstance(denominator, float):  # the count of probability targets
        device = array_api_compat.device(problem.input)
        return backend.xp.asarray(denominator, device=device)
    return denominator


# --- The blocks ---------------------------------------------------------------------------


def run(linear: Linear, upstream=None, wants=(True, True, True), out=(None, None, None)):
    """``(loss, d_input, d_linear_weight, d_linear_bias)``: the loss of every block, and
    with ``upstream`` the gradients asked for in ``wants`` (None for the others).

    ``out`` holds arrays (or None) to write the gradients into (NumPy only, checked).
    With ``return_stats`` the loss is a ``LossAndStats``: each block's statistics come
    from the pass that computes its loss (``_token_stats.block_loss_and_stats``).
    """
    algebra = linear.algebra
    buffer = algebra.buffer(linear)
    grads = None if upstream is None else algebra.gradients(linear, wants, out)
    solve = _block_solver(linear)
    losses = []
    for rows in linear.blocks():
        with algebra.threads(linear, rows, grads is not None):
            hidden = linear.hidden[rows, ...]
            logits = algebra.logits(linear, hidden, buffer)
            block = linear.block_problem(logits, linear.block_arrays(rows))
            if grads is None:
                losses.append(solve.forward(block))
                continue
            # The gradient over the logits where they live in the algebra's own buffer;
            # arrays of the functional algebra may be immutable (JAX)
            in_buffer = block.input if buffer is not None else None
            loss, grad = solve.forward_backward(
                block, linear.upstream_rows(upstream, rows), out=in_buffer
            )
            losses.append(loss)
            grad = linear.xp.reshape(grad, logits.shape)
            grads = algebra.add(linear, grads, rows, grad, hidden)
    loss = _combined(linear, losses, algebra.accumulation_dtype(linear))
    if grads is None:
        return loss, None, None, None
    return (loss, *algebra.finish(linear, grads))


def _block_solver(linear: Linear):
    """What computes a block: the backend, or with ``return_stats`` the loss with the
    statistics of its logits."""
    if not linear.problem.return_stats:
        return linear.backend
    from .. import _token_stats  # imports this module

    return _token_stats.BlockSolver(linear.backend)


def _combined(linear: Linear, losses: list, accumulation_dtype):
    """The blocks' losses as one: concatenated for 'none', else summed (in
    ``accumulation_dtype``) and rounded once to the input's dtype. With ``return_stats``
    (``LossAndStats`` per block) the statistics too, concatenated."""
    if linear.problem.return_stats:
        from .. import _token_stats

        loss = _summed(linear, [part.loss for part in losses], accumulation_dtype)
        stats = _token_stats.joined(linear, [part.stats for part in losses])
        return _token_stats.LossAndStats(loss, stats)
    return _summed(linear, losses, accumulation_dtype)


def _summed(linear: Linear, losses: list, accumulation_dtype):
    xp, dtype = linear.xp, linear.input.dtype
    if linear.problem.elementwise:
        return xp.astype(xp.concat(losses, axis=0), dtype)
    if len(losses) == 1:
        return xp.astype(losses[0], dtype)
    stacked = xp.stack([xp.astype(loss, accumulation_dtype) for loss in losses])
    # kept as an array: NumPy's full sum gives a scalar, the loss is a 0-d array as from one block
    return xp.astype(xp.reshape(xp.sum(stacked, keepdims=True), ()), dtype)


class NumpyAlgebra:
    """NumPy: every product into a preallocated array (BLAS through ``np.matmul``)."""

    # Bytes of the scratch that the product of a block for some rows of dW lands in before
    # it is added, so that no dW-sized temporary exists. Measured at blocks of (128 or 256,
    # 32000), D = 512 (OpenBLAS, 2 cores): 1024 rows of dW at a time took 1.4-1.8x as long
    # as 4096 (8 MiB here); larger is no faster.
    SCRATCH_BYTES = 8 << 20

    @staticmethod
    def accumulation_dtype(linear: Linear):
        return np.float64

    @staticmethod
    def threads(linear: Linear, rows: slice, gradients: bool):
        """The threads a block runs on: the BLAS's own (NumPy has no way to set them)."""
        return contextlib.nullcontext()

    @staticmethod
    def buffer(linear: Linear):
        return np.empty((min(linear.chunk_rows, linear.rows), linear.outputs), linear.weight.dtype)

    @staticmethod
    def logits(linear: Linear, hidden, buffer):
        logits = buffer[: hidden.shape[0]]
        np.matmul(hidden, linear.weight.T, out=logits)
        if linear.bias is not None:
            logits += linear.bias
        return logits

    @staticmethod
    def gradients(linear: Linear, wants, out):
        dtype, (rows, features) = linear.weight.dtype, linear.hidden.shape
        d_input = (
            _output(out[0], linear.input, dtype, np.empty, (rows, features)) if wants[0] else None
        )
        d_weight = d_bias = None
        if wants[1]:
            d_weight = _output(out[1], linear.linear_weight, dtype, np.zeros, linear.weight.shape)
        if linear.bias is not None and wants[2]:
            d_bias = _output(out[2], linear.linear_bias, dtype, np.zeros, linear.bias.shape)
        scratch_rows = max(1, NumpyAlgebra.SCRATCH_BYTES // max(1, features * dtype.itemsize))
        scratch = np.empty((min(scratch_rows, linear.outputs), features), dtype)
        return d_input, d_weight, d_bias, scratch

    @staticmethod
    def add(linear: Linear, grads, rows: slice, grad, hidden):
        d_input, d_weight, d_bias, scratch = grads
        if d_weight is not None:
            for start in range(0, linear.outputs, max(1, len(scratch))):
                part = slice(start, min(start + len(scratch), linear.outputs))
                product = scratch[: part.stop - part.start]
                np.matmul(grad[:, part].T, hidden, out=product)
                d_weight[part] += product
        if d_bias is not None:
            d_bias += grad.sum(axis=0)
        if d_input is not None:
            # (W.T @ G.T).T: OpenBLAS is slow at G @ W with few rows and a long inner axis
            # (0.86 s instead of 0.06 s for (128, 32000) @ (32000, 512) here)
            d_input[rows] = np.matmul(linear.weight.T, grad.T).T
        return grads

    @staticmethod
    def finish(linear: Linear, grads):
        d_input, d_weight, d_bias, _ = grads
        return (
            _shaped(d_input, linear.input),
            _shaped(d_weight, linear.linear_weight),
            _shaped(d_bias, linear.linear_bias),
        )


NUMPY_ALGEBRA = NumpyAlgebra()


def _output(out, like, dtype, make, shape):
    """The array a gradient accumulates in: ``out`` (of ``like``'s shape and dtype) viewed
    as ``shape`` when it is of the compute dtype, else a new one."""
    if out is not None and out.dtype == dtype:
        if make is np.zeros:
            out[...] = 0
        return out.reshape(shape)
    return make(shape, dtype)


def _shaped(grad, like):
    """A gradient in ``like``'s shape and dtype."""
    if grad is None:
        return None
    return grad.reshape(like.shape).astype(like.dtype, copy=False)


class FunctionalAlgebra:
    """Array-API namespaces without in-place writes (Dask, array-api-strict): each product
    is a new array, the input's gradient is concatenated from the blocks'."""

    @staticmethod
    def accumulation_dtype(linear: Linear):
        return linear.hidden.dtype

    @staticmethod
    def threads(linear: Linear, rows: slice, gradients: bool):
        """The threads a block runs on: the library's own."""
        return contextlib.nullcontext()

    @staticmethod
    def buffer(linear: Linear):
        return None

    @staticmethod
    def logits(linear: Linear, hidden, buffer):
        xp = linear.xp
        logits = xp.matmul(hidden, xp.matrix_transpose(linear.weight))
        return logits if linear.bias is None else logits + linear.bias

    @staticmethod
    def gradients(linear: Linear, wants, out):
        xp, device = linear.xp, array_api_compat.device(linear.hidden)
        zeros = xp.zeros(linear.weight.shape, dtype=linear.weight.dtype, device=device)
        bias = None
        if linear.bias is not None and wants[2]:
            bias = xp.zeros(linear.bias.shape, dtype=linear.bias.dtype, device=device)
        return [] if wants[0] else None, zeros if wants[1] else None, bias

    @staticmethod
    def add(linear: Linear, grads, rows: slice, grad, hidden):
        xp = linear.xp
        d_input, d_weight, d_bias = grads
        if d_weight is not None:
            d_weight = d_weight + xp.matmul(xp.matrix_transpose(grad), hidden)
        if d_bias is not None:
            d_bias = d_bias + xp.sum(grad, axis=0)
        if d_input is not None:
            d_input.append(xp.matmul(grad, linear.weight))
        return d_input, d_weight, d_bias

    @staticmethod
    def finish(linear: Linear, grads):
        xp = linear.xp
        d_input, d_weight, d_bias = grads
        if d_input is not None:
            d_input = xp.concat(d_input, axis=0) if len(d_input) > 1 else d_input[0]

        def shaped(grad, like):
            if grad is None:
                return None
            return xp.astype(xp.reshape(grad, tuple(like.shape)), like.dtype)

        return (
            shaped(d_input, linear.input),
            shaped(d_weight, linear.linear_weight),
            shaped(d_bias, linear.linear_bias),
        )

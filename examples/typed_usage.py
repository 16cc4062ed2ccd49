"""nllloss in a strictly typed program: the loss has the type of its input's library.

``mypy --strict examples/typed_usage.py`` passes (the test-suite runs it): the loss of a
torch tensor is a ``torch.Tensor`` (so ``loss.backward()`` and ``loss.detach()`` type-check),
that of a NumPy array an ``ndarray``, that of a JAX array a ``jax.Array``, and
``return_lse=True`` gives a pair of them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpy.typing as npt
import torch

import nllloss
import nllloss.torch


def torch_step(logits: torch.Tensor, target: torch.Tensor) -> float:
    """One training step's loss from logits, with the log-sum-exp for logging."""
    loss, lse = nllloss.nll_loss(logits, target, from_logits=True, z_loss=1e-4, return_lse=True)
    loss.backward()
    print("mean log-sum-exp", float(lse.detach().mean()))
    return float(loss.detach())


def torch_module(hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The drop-in ``torch.nn`` module: the loss from hidden states."""
    head = nllloss.torch.LinearCrossEntropyLoss(hidden.shape[1], 10)
    loss: torch.Tensor = head(hidden, target)
    return loss


def numpy_step(
    logits: npt.NDArray[np.float32], target: npt.NDArray[np.int64]
) -> tuple[float, npt.NDArray[np.float32]]:
    """Loss and gradient on NumPy, the gradient written over the logits."""
    loss, grad = nllloss.nll_loss_and_grad(logits, target, from_logits=True, out=logits)
    return float(loss), grad


def numpy_eval(log_probs: npt.NDArray[np.float64], target: npt.NDArray[np.int64]) -> float:
    """The mean over a batch, and the same mean from two halves and the whole's denominator."""
    whole = nllloss.nll_loss(log_probs, target)
    total = nllloss.total_weight(target)
    halves = [
        nllloss.nll_loss(log_probs[rows], target[rows], total_weight=total)
        for rows in (slice(0, 2), slice(2, None))
    ]
    assert np.isclose(float(sum(halves)), float(whole))
    return float(whole)


def jax_grad(logits: jax.Array, target: jax.Array) -> jax.Array:
    """The gradient through ``jax.grad``: the loss of a JAX array is a JAX array."""

    def loss(x: jax.Array) -> jax.Array:
        return nllloss.nll_loss(x, target, from_logits=True, label_smoothing=0.1)

    gradient: jax.Array = jax.grad(loss)(logits)
    return gradient


if __name__ == "__main__":
    rng = np.random.default_rng(0)
    logits = torch.randn(4, 10, requires_grad=True)
    print("torch", torch_step(logits, torch.tensor([1, 2, 3, -100])))
    print("module", float(torch_module(torch.randn(4, 8), torch.tensor([0, 1, 2, 3])).detach()))
    x = rng.standard_normal((4, 10), dtype=np.float32)
    print("numpy", numpy_step(x, np.array([1, 2, 3, 4]))[0])
    log_p = np.log(rng.dirichlet(np.ones(5), 4))
    print("halves", numpy_eval(log_p, np.array([0, -100, 3, 4])))
    print("jax", jax_grad(jnp.ones((2, 3)), jnp.array([0, 2])).shape)

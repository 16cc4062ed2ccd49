"""GPU check of the generic path: CuPy arrays, CUDA torch tensors and GPU JAX arrays.

Run on a machine with a CUDA GPU (CI has none): ``python benchmarks/gpu_backends.py [OUT.md]``.
For each library and reduction it compares nllloss's loss and gradient with torch's CUDA
``F.nll_loss`` (and autograd) on the same data, checks that results stay on the GPU in the
caller's library, that out-of-range targets raise the core's IndexError, and that a NumPy
weight joins the input's device. Prints a Markdown report (and writes it to OUT.md).
"""

from __future__ import annotations

import platform
import sys

import numpy as np

import nllloss


def main(out: str | None = None) -> int:
    import torch
    import torch.nn.functional as F

    rows = []
    failures = 0
    rng = np.random.default_rng(0)
    for shape in [(64, 10), (4096, 1000), (8, 21, 64, 64)]:
        x_np = np.log(rng.dirichlet(np.ones(shape[1]), (shape[0], *shape[2:]))).astype(np.float32)
        x_np = np.moveaxis(x_np, -1, 1).copy()
        t_np = rng.integers(0, shape[1], (shape[0], *shape[2:]))
        t_np.reshape(-1)[::7] = -100
        w_np = rng.uniform(0.1, 2.0, shape[1]).astype(np.float32)
        for reduction in ("none", "mean", "sum"):
            xt = torch.from_numpy(x_np).cuda().requires_grad_()
            ref = F.nll_loss(
                xt,
                torch.from_numpy(t_np).cuda(),
                weight=torch.from_numpy(w_np).cuda(),
                reduction=reduction,
            )
            ref.sum().backward()
            ref_loss, ref_grad = ref.detach().cpu().numpy(), xt.grad.cpu().numpy()
            for library, run in _libraries():
                try:
                    loss, grad, where = run(x_np, t_np, w_np, reduction)
                    ok_loss = np.allclose(loss, ref_loss, rtol=2e-5, atol=1e-6)
                    ok_grad = np.allclose(grad, ref_grad, rtol=2e-5, atol=1e-7)
                    status = (
                        "ok" if ok_loss and ok_grad else f"MISMATCH loss={ok_loss} grad={ok_grad}"
                    )
                except Exception as error:  # reported, not hidden
                    status, where = f"ERROR {type(error).__name__}: {error}", "-"
                failures += status != "ok"
                rows.append((library, "x".join(map(str, shape)), reduction, where, status))

    for library, run in _libraries():
        try:
            run(np.zeros((2, 3), np.float32), np.array([0, 5]), None, "mean")
            status = "MISSING IndexError"
        except IndexError as error:
            status = f"ok: {error}"
        failures += not status.startswith("ok")
        rows.append((library, "2x3", "bad target", "-", status))

    try:
        nllloss.nll_loss(torch.zeros(2, 3, device="cuda"), torch.tensor([0, 1]))
        status = "MISSING ValueError"
    except ValueError as error:
        status = f"ok: {error}"
    failures += not status.startswith("ok")
    rows.append(("torch (cuda)", "2x3", "target on cpu", "-", status))

    report = [
        f"# GPU check of nllloss's generic path\n\n- device: {torch.cuda.get_device_name()}",
        f"- python {platform.python_version()}, torch {torch.__version__}, "
        f"nllloss {nllloss.__version__}",
        "\n| library | shape | reduction | result device | vs torch CUDA (loss and grad) |",
        "|---|---|---|---|---|",
        *(f"| {' | '.join(row)} |" for row in rows),
        f"\n{len(rows) - failures} passed, {failures} failed",
    ]
    text = "\n".join(report)
    print(text)
    if out:
        with open(out, "w") as handle:
            handle.write(text + "\n")
    return 1 if failures else 0


def _libraries():
    def torch_cuda(x, t, w, reduction):
        import torch

        xt = torch.from_numpy(x).cuda().requires_grad_()
        weight = None if w is None else w  # a NumPy weight joins the input's device
        loss = nllloss.nll_loss(xt, torch.from_numpy(t).cuda(), weight=weight, reduction=reduction)
        loss.sum().backward()
        assert loss.is_cuda
        assert xt.grad.is_cuda
        return loss.detach().cpu().numpy(), xt.grad.cpu().numpy(), str(loss.device)

    def cupy(x, t, w, reduction):
        import cupy

        xc, tc = cupy.asarray(x), cupy.asarray(t)
        loss = nllloss.nll_loss(xc, tc, weight=w, reduction=reduction)
        go = cupy.ones(loss.shape, dtype=loss.dtype)
        grad = nllloss.nll_loss_backward(go, xc, tc, weight=w, reduction=reduction)
        assert isinstance(loss, cupy.ndarray)
        assert isinstance(grad, cupy.ndarray)
        return cupy.asnumpy(loss), cupy.asnumpy(grad), f"cupy:{loss.device.id}"

    def jax_gpu(x, t, w, reduction):
        import jax
        import jax.numpy as jnp

        xj, tj = jnp.asarray(x), jnp.asarray(t)
        loss = nllloss.nll_loss(xj, tj, weight=w, reduction=reduction)
        grad = jax.grad(lambda a: nllloss.nll_loss(a, tj, weight=w, reduction=reduction).sum())(xj)
        return np.asarray(loss), np.asarray(grad), str(next(iter(loss.devices())))

    return [("torch (cuda)", torch_cuda), ("cupy", cupy), ("jax", jax_gpu)]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else None))

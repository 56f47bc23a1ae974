"""Fine-tune a rank-4 LoRA adapter with and without ALLoRA on a toy regression task (CPU, seconds).

The "pretrained" model is a frozen random linear layer ``W0``; the task's true weights are
``W0 + U V`` with a rank-2 change ``U V``; the data are Gaussian inputs and the matching outputs
plus a little noise. The adapter adds ``s * B A`` to ``W0`` (A: r x in, random; B: out x r, zero
at the start, as LoRA initialises them). Both runs are dropout-free and use ``fastsched.AdamW``:

* LoRA: the standard scaling ``s = alpha / r``, a plain parameter group;
* ALLoRA (Huang & Balestriero, arXiv 2410.09692): no scaling (``s = 1``); the group option
  ``allora_eta`` multiplies the gradient of each row of A and B by
  ``1 / sqrt(||row||^2 + 1 / eta^2)`` inside the fused step, so B leaves zero at a rate set by
  ``eta`` and rows slow down as their norm grows.

Run ``python examples/allora_lora.py [--steps 200]``: prints both loss curves side by side.
Nothing here says which one wins in general: one toy task, one seed.
"""

from __future__ import annotations

import argparse
import math

import torch

import fastsched


def make_task(d_in=32, d_out=16, rank=2, n=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    w0 = torch.randn(d_out, d_in, generator=g) / math.sqrt(d_in)
    delta = torch.randn(d_out, rank, generator=g) @ torch.randn(rank, d_in, generator=g)
    w_true = w0 + 0.3 * delta / math.sqrt(d_in)
    x = torch.randn(n, d_in, generator=g)
    y = x @ w_true.t() + 0.01 * torch.randn(n, d_out, generator=g)
    return w0, x, y


class LoRALinear(torch.nn.Module):
    """A frozen weight plus ``scaling * B @ A`` (no dropout)."""

    def __init__(self, w0: torch.Tensor, r: int, scaling: float, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        d_out, d_in = w0.shape
        self.register_buffer("w0", w0.clone())
        bound = 1.0 / math.sqrt(d_in)  # kaiming_uniform(a=sqrt(5)) as in common LoRA code
        self.A = torch.nn.Parameter((torch.rand(r, d_in, generator=g) * 2 - 1) * bound)
        self.B = torch.nn.Parameter(torch.zeros(d_out, r))
        self.scaling = scaling

    def forward(self, x):
        return x @ self.w0.t() + self.scaling * (x @ self.A.t()) @ self.B.t()


def train(allora: bool, *, steps: int, lr: float, eta: float, r: int = 4, alpha: float = 8.0,
          batch: int = 64, seed: int = 0) -> list[float]:
    w0, x, y = make_task(seed=seed)
    model = LoRALinear(w0, r, 1.0 if allora else alpha / r, seed=seed + 1)
    group = {"params": [model.A, model.B]}
    if allora:
        group.update(allora_eta=eta, allora_unit="row")
    opt = fastsched.AdamW([group], lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed + 2)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (batch,), generator=g)
        loss = torch.nn.functional.mse_loss(model(x[idx]), y[idx])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def main(steps: int = 200, every: int = 20, lr: float = 1e-2, eta: float = 2.0, seed: int = 0,
         verbose: bool = True) -> dict[str, list[float]]:
    curves = {"lora": train(False, steps=steps, lr=lr, eta=eta, seed=seed),
              "allora": train(True, steps=steps, lr=lr, eta=eta, seed=seed)}
    if verbose:
        print(f"{'step':>6}  {'LoRA (alpha/r = 2)':>20}  {f'ALLoRA (eta = {eta:g})':>20}")
        for i in list(range(0, steps, every)) + [steps - 1]:
            print(f"{i:>6}  {curves['lora'][i]:>20.5f}  {curves['allora'][i]:>20.5f}")
    return curves


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--eta", type=float, default=2.0)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    main(a.steps, lr=a.lr, eta=a.eta, seed=a.seed)

"""An eager float64 oracle for the fused optimizer steps: Adam / AdamW / SGD as ``torch.optim``
writes them, with global-norm clipping, the non-finite skip, a gradient scale, ALLoRA unit
scaling and the statistics the optimizers report. Independent of ``fastsched.optim._reference``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

F64 = torch.float64


def allora_scale64(p: torch.Tensor, unit: str, eta: float) -> torch.Tensor:
    """1 / sqrt(||theta_unit||^2 + 1/eta^2) in float64, broadcast to ``p``'s shape.

    Units: rows or columns of ``p.reshape(p.shape[0], -1)``, or the whole tensor; tensors with
    fewer than two dimensions are one unit.
    """
    x = p.detach().to(F64)
    if x.numel() == 0:
        return torch.ones_like(x)
    if x.dim() < 2 or unit == "tensor":
        return torch.full_like(x, 1.0 / math.sqrt(float((x * x).sum()) + 1.0 / eta ** 2))
    m = x.reshape(x.shape[0], -1)
    sq = (m * m).sum(dim=1 if unit == "row" else 0, keepdim=True)
    return (1.0 / torch.sqrt(sq + 1.0 / eta ** 2)).expand_as(m).reshape(x.shape)


@dataclass
class Hyper:
    """Hyperparameters of one tensor (its group's)."""

    lr: float
    group: int = 0
    kind: str = "adam"  # "adam" | "sgd"
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    decoupled: bool = True
    amsgrad: bool = False
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    allora_eta: float | None = None
    allora_unit: str = "row"
    allora_apply: str = "grad"  # "grad": the unit's gradient is scaled; "update": its step


@dataclass
class Oracle:
    """float64 optimizer over a list of tensors; ``step`` returns the step's statistics."""

    params: list[torch.Tensor]
    hypers: list[Hyper]
    schedule: object = lambda t: 1.0  # noqa: E731 - clock -> multiplier
    max_grad_norm: float | None = None
    clock: int = 0
    skip_count: int = 0
    state: list[dict] = field(default_factory=list)

    def __post_init__(self):
        self.params = [p.detach().to(F64).clone() for p in self.params]
        self.state = [{"step": 0, "m": torch.zeros_like(p), "v": torch.zeros_like(p),
                       "vmax": torch.zeros_like(p), "buf": None} for p in self.params]

    def step(self, grads, grad_scale: float = 1.0, found_inf: bool = False) -> dict:
        g = [x.detach().to(F64) / grad_scale for x in grads]
        finite = [torch.isfinite(x) for x in g]
        ok = [torch.where(f, x, 0.0) for x, f in zip(g, finite)]
        tnorm = [float((x * x).sum().sqrt()) for x in ok]
        l2 = math.sqrt(sum(n * n for n in tnorm))
        l1 = sum(float(x.abs().sum()) for x in ok)
        bad = sum(int((~f).sum()) for f in finite)
        coef = 1.0 if self.max_grad_norm is None else min(1.0, self.max_grad_norm / (l2 + 1e-6))
        factor = float(self.schedule(self.clock))
        out = {"grad_norm": l2, "grad_norm_l1": l1, "clip_coef": coef, "nonfinite": bad,
               "tensor_grad_norm": tnorm, "factor": factor, "clock": self.clock,
               "skipped": bool(bad or found_inf)}
        if out["skipped"]:
            self.skip_count += 1
            out["skip_count"] = self.skip_count
            return out
        pnorm, urms = [], []
        for i, (p, h) in enumerate(zip(self.params, self.hypers)):
            st = self.state[i]
            lr = h.lr * factor
            gi = g[i] * coef
            unit_scale = 1.0
            if h.allora_eta is not None:
                unit_scale = allora_scale64(p, h.allora_unit, h.allora_eta)
                if h.allora_apply == "grad":
                    gi, unit_scale = gi * unit_scale, 1.0
            st["step"] += 1
            t = st["step"]
            if h.kind == "adam":
                b1, b2 = h.betas
                if h.decoupled:
                    p.mul_(1.0 - lr * h.weight_decay)
                else:
                    gi = gi + h.weight_decay * p
                st["m"] = b1 * st["m"] + (1 - b1) * gi
                st["v"] = b2 * st["v"] + (1 - b2) * gi * gi
                vv = st["v"]
                if h.amsgrad:
                    st["vmax"] = torch.maximum(st["vmax"], st["v"])
                    vv = st["vmax"]
                u = (st["m"] / (1 - b1 ** t)) / ((vv / (1 - b2 ** t)).sqrt() + h.eps)
            else:
                u = gi + h.weight_decay * p
                if h.momentum:
                    st["buf"] = (u.clone() if st["buf"] is None
                                 else h.momentum * st["buf"] + (1 - h.dampening) * u)
                    u = u + h.momentum * st["buf"] if h.nesterov else st["buf"]
            u = u * unit_scale  # "update": the unit's step (after the decoupled decay)
            p.sub_(lr * u)
            pnorm.append(float(p.norm()))
            urms.append(float(u.pow(2).mean().sqrt()) if u.numel() else 0.0)
        self.clock += 1
        out.update(skip_count=self.skip_count, tensor_param_norm=pnorm, tensor_update_rms=urms)
        return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (0 for empty tensors; 0 when both are exactly 0)."""
    a, b = a.detach().to(F64).cpu(), b.detach().to(F64).cpu()
    if a.numel() == 0:
        return 0.0
    d = float((a - b).abs().max())
    s = float(b.abs().max())
    return d / s if s else d

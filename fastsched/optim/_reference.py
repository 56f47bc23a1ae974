"""Plain PyTorch implementation of the fused step: the CPU backend and the oracle for the kernels.

It follows the same passes as the Triton backend (finalize: schedule and per-tensor scalars in
float64 from device tensors; update: fp32 arithmetic, one rounding to the storage dtype), with the
same formulas, so the two agree to fp32 rounding. It never reads a device value on the host, so it
is also sync-free on CUDA tensors (just slow: several kernels per tensor).
"""

from __future__ import annotations

import math

import torch

from ..schedules import Schedule

__all__ = ["adam_reference", "sgd_reference", "grad_statistics", "allora_scales", "GroupHyper"]

#: per group: (lr, c1, c2, eps, weight_decay, maximize, flag, decoupled) as in the kernel's table
GroupHyper = tuple[float, float, float, float, float, float, float, float]


def grad_statistics(grads, *, max_grad_norm: float | None, guard: bool,
                    grad_scale: torch.Tensor | None = None, found_inf: torch.Tensor | None = None,
                    reduce=None):
    """Global-norm clipping coefficient, skip flag and gradient statistics, on the device.

    As ``torch.nn.utils.clip_grad_norm_``: ``coef = min(max_norm / (norm + 1e-6), 1)`` with the
    L2 norm of all gradients (unscaled by ``1 / grad_scale`` first); non-finite elements are
    counted, and left out of the norms when ``guard`` is on (else the norms and the coefficient
    are non-finite, as torch's). Returns ``(grad_mul, active, stats)``: the multiplier of
    every gradient (coefficient / grad scale), a 0-d bool (False: skip the step) and a dict of
    0-d / per-tensor float64 tensors. ``reduce`` (or None) sums the (n, 3) per-tensor
    (sum g^2, sum |g|, non-finite count) of local shards over ranks before anything is derived.
    """
    dev = grads[0].device
    inv_scale = (torch.ones((), dtype=torch.float64, device=dev) if grad_scale is None
                 else 1.0 / grad_scale.reshape(()).to(torch.float64))
    sq, ab, nf = [], [], []
    for g in grads:
        g32 = g.to(torch.float64)
        bad = ~torch.isfinite(g32)
        ok = torch.where(bad, 0.0, g32) if guard else g32
        sq.append((ok * ok).sum())
        ab.append(ok.abs().sum())
        nf.append(bad.sum().to(torch.float64))
    sums = torch.stack([torch.stack(sq), torch.stack(ab), torch.stack(nf)], 1)
    if reduce is not None:
        sums = reduce(sums)
    sq, ab, nf = sums.unbind(1)
    gnorm = sq.sum().sqrt() * inv_scale
    nonfinite = nf.sum()
    one = torch.ones((), dtype=torch.float64, device=dev)
    coef = one if max_grad_norm is None else torch.clamp(max_grad_norm / (gnorm + 1e-6), max=1.0)
    active = torch.ones((), dtype=torch.bool, device=dev)
    if guard:
        active = nonfinite == 0
    if found_inf is not None:
        active = active & (found_inf.reshape(()) == 0)
    stats = {"grad_norm": gnorm, "grad_norm_l1": ab.sum() * inv_scale, "clip_coef": coef,
             "nonfinite": nonfinite, "inv_scale": inv_scale,
             "tensor_norms": sq.sqrt() * inv_scale}
    return coef * inv_scale, active, stats


def allora_scales(p: torch.Tensor, unit: str, eta: float, reduce=None) -> torch.Tensor:
    """ALLoRA gradient multiplier ``1 / sqrt(||theta_unit||^2 + 1 / eta^2)`` shaped like ``p``.

    Units are the rows or columns of ``p.reshape(p.shape[0], -1)`` or the whole tensor (always
    the whole tensor below two dimensions). ``reduce`` (or None) sums the per-unit partial sums
    of squares over the ranks holding parts of a unit (a sharded parameter's local shard); it
    is called on every rank, also for an empty shard.
    """
    p32 = p.to(torch.float32)
    inv = 1.0 / float(eta) ** 2
    if p.dim() < 2 or unit == "tensor":
        n = (p32 * p32).sum()
        if reduce is not None:
            n = reduce(n.reshape(1)).reshape(())
        return (1.0 / torch.sqrt(n + inv)).expand_as(p32)
    cols = math.prod(p.shape[1:])
    v = p32.reshape(p.shape[0], cols)
    n = (v * v).sum(1 if unit == "row" else 0, keepdim=True)
    if reduce is not None:
        n = reduce(n)
    return (1.0 / torch.sqrt(n + inv)).expand_as(v).reshape(p.shape)


def _step_scalars(schedule: Schedule, clock: torch.Tensor, grad_mul, active):
    """(gradient multiplier, active flag, step increment, schedule value) as device tensors."""
    one = torch.ones((), dtype=torch.float64, device=clock.device)
    gm = one if grad_mul is None else grad_mul.to(torch.float64)
    act = torch.ones((), dtype=torch.bool, device=clock.device) if active is None else active
    return gm, act, act.to(torch.float64), schedule.evaluate(clock.reshape(1))[0]


def adam_reference(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, group_index,
                   groups: list[GroupHyper], schedule: Schedule, clock: torch.Tensor,
                   grad_mul: torch.Tensor | None = None,
                   active: torch.Tensor | None = None, scales=None) -> torch.Tensor:
    """Adam / AdamW step for every tensor, as ``torch.optim.Adam(W)`` with ``fused=True``.

    ``max_exp_avg_sqs[i]`` is None where amsgrad is off. ``grad_mul`` (a 0-d float64 tensor,
    clip coefficient times 1 / grad scale) multiplies every gradient; ``active`` (0-d bool tensor)
    gates the whole step; ``scales[i]`` (ALLoRA, or None) multiplies gradient ``i``. Updates
    tensors in place, advances ``steps`` and ``clock``, and returns per tensor
    (sum of new p^2, sum of u^2) with u the unscaled update m_hat / (sqrt(v_hat) + eps).
    """
    gm, act, inc, factor = _step_scalars(schedule, clock, grad_mul, active)
    ustat = []
    for i, p in enumerate(params):
        lr0, b1, b2, eps, wd, maximize, _, decoupled = groups[group_index[i]][:8]
        lr = factor * lr0
        new_step = steps[i].to(torch.float64) + inc
        bc1 = 1.0 - torch.pow(torch.tensor(b1, dtype=torch.float64), new_step)
        bc2 = 1.0 - torch.pow(torch.tensor(b2, dtype=torch.float64), new_step)
        step_size = (lr / bc1).to(torch.float32)
        bc2_sqrt = bc2.sqrt().to(torch.float32)
        sign = -1.0 if maximize else 1.0
        g = grads[i].to(torch.float32) * (sign * gm).to(torch.float32)
        if scales is not None and scales[i] is not None:
            g = g * scales[i]
        p32 = p.to(torch.float32)
        if decoupled:
            p32 = p32 * (1.0 - lr * wd).to(torch.float32)
        else:
            g = g + torch.tensor(wd, dtype=torch.float32) * p32
        # 1 - beta rounded once from float64, as the kernel (fp32 1 - 0.999 is 1.3e-5 off)
        omb1 = torch.tensor(1.0 - b1, dtype=torch.float32)
        omb2 = torch.tensor(1.0 - b2, dtype=torch.float32)
        m = exp_avgs[i].to(torch.float32)
        # torch's lerp: from the nearer end (beta1 = 0: m = g exactly)
        m = m + omb1 * (g - m) if 1.0 - b1 < 0.5 else g - (g - m) * (1.0 - omb1)
        v = (1.0 - omb2) * exp_avg_sqs[i].to(torch.float32) + omb2 * g * g
        vv = v
        if max_exp_avg_sqs[i] is not None:
            vmax = torch.maximum(max_exp_avg_sqs[i].to(torch.float32), v)
            max_exp_avg_sqs[i].copy_(torch.where(act, vmax, max_exp_avg_sqs[i]))
            vv = vmax
        denom = vv.sqrt() / bc2_sqrt + torch.tensor(eps, dtype=torch.float32)
        u = m / denom
        p32 = p32 - step_size * u
        ustat.append(torch.stack([(p32.double() ** 2).sum(),
                                  ((u.double() / bc1) ** 2).sum()]))
        p.copy_(torch.where(act, p32.to(p.dtype), p))
        exp_avgs[i].copy_(torch.where(act, m.to(p.dtype), exp_avgs[i]))
        exp_avg_sqs[i].copy_(torch.where(act, v.to(p.dtype), exp_avg_sqs[i]))
        steps[i].copy_(new_step)
    clock.add_(act.to(clock.dtype))
    return torch.stack(ustat)


def sgd_reference(params, grads, momentum_buffers, steps, group_index, groups: list[GroupHyper],
                  schedule: Schedule, clock: torch.Tensor, grad_mul: torch.Tensor | None = None,
                  active: torch.Tensor | None = None, scales=None) -> torch.Tensor:
    """SGD step as ``torch.optim.SGD`` (momentum, dampening, nesterov, weight decay, maximize).

    ``momentum_buffers[i]`` is None where the group has no momentum; the first step copies
    ``d_p`` into the buffer, as torch does. ``scales`` as in :func:`adam_reference`; returns per
    tensor (sum of new p^2, sum of d^2).
    """
    gm, act, inc, factor = _step_scalars(schedule, clock, grad_mul, active)
    ustat = []
    for i, p in enumerate(params):
        lr0, momentum, dampening, _, wd, maximize, nesterov, _ = groups[group_index[i]][:8]
        lr = (factor * lr0).to(torch.float32)
        sign = -1.0 if maximize else 1.0
        p32 = p.to(torch.float32)
        d = grads[i].to(torch.float32) * (sign * gm).to(torch.float32)
        if scales is not None and scales[i] is not None:
            d = d * scales[i]
        d = d + torch.tensor(wd, dtype=torch.float32) * p32
        buf = momentum_buffers[i]
        if buf is not None:
            first = steps[i] == 0
            a = torch.where(first, 0.0, momentum).to(torch.float32)
            b = torch.where(first, 1.0, 1.0 - dampening).to(torch.float32)
            nb = a * buf.to(torch.float32) + b * d
            buf.copy_(torch.where(act, nb.to(buf.dtype), buf))
            d = d + torch.tensor(momentum, dtype=torch.float32) * nb if nesterov else nb
        p32 = p32 - lr * d
        ustat.append(torch.stack([(p32.double() ** 2).sum(), (d.double() ** 2).sum()]))
        p.copy_(torch.where(act, p32.to(p.dtype), p))
        steps[i].copy_(steps[i].to(torch.float64) + inc)
    clock.add_(act.to(clock.dtype))
    return torch.stack(ustat)

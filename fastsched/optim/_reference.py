"""Plain PyTorch implementation of the fused step: the CPU backend and the oracle for the kernels.

It follows the same passes as the Triton backend (finalize: schedule and per-tensor scalars in
float64 from device tensors; update: fp32 arithmetic, one rounding to the storage dtype), with the
same formulas, so the two agree to fp32 rounding. It never reads a device value on the host, so it
is also sync-free on CUDA tensors (just slow: several kernels per tensor).
"""

from __future__ import annotations

import torch

from ..schedules import Schedule

__all__ = ["adam_reference", "sgd_reference", "GroupHyper"]

#: per group: (lr, c1, c2, eps, weight_decay, maximize, flag, decoupled) as in the kernel's table
GroupHyper = tuple[float, float, float, float, float, float, float, float]


def _schedule_lr(schedule: Schedule, clock: torch.Tensor, lr: float) -> torch.Tensor:
    return schedule.evaluate(clock.reshape(1))[0] * lr


def adam_reference(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, group_index,
                   groups: list[GroupHyper], schedule: Schedule, clock: torch.Tensor,
                   grad_mul: torch.Tensor | None = None,
                   active: torch.Tensor | None = None) -> None:
    """Adam / AdamW step for every tensor, as ``torch.optim.Adam(W)`` with ``fused=True``.

    ``max_exp_avg_sqs[i]`` is None where amsgrad is off. ``grad_mul`` (a 0-d float64 tensor,
    clip coefficient times 1 / grad scale) multiplies every gradient; ``active`` (0-d bool tensor)
    gates the whole step. Updates tensors in place and advances ``steps`` and ``clock``.
    """
    one = torch.ones((), dtype=torch.float64, device=clock.device)
    gm = one if grad_mul is None else grad_mul.to(torch.float64)
    act = torch.ones((), dtype=torch.bool, device=clock.device) if active is None else active
    inc = act.to(torch.float64)
    for i, p in enumerate(params):
        lr0, b1, b2, eps, wd, maximize, _, decoupled = groups[group_index[i]]
        lr = _schedule_lr(schedule, clock, lr0)
        new_step = steps[i].to(torch.float64) + inc
        bc1 = 1.0 - torch.pow(torch.tensor(b1, dtype=torch.float64), new_step)
        bc2 = 1.0 - torch.pow(torch.tensor(b2, dtype=torch.float64), new_step)
        step_size = (lr / bc1).to(torch.float32)
        bc2_sqrt = bc2.sqrt().to(torch.float32)
        sign = -1.0 if maximize else 1.0
        g = grads[i].to(torch.float32) * (sign * gm).to(torch.float32)
        p32 = p.to(torch.float32)
        if decoupled:
            p32 = p32 * (1.0 - lr * wd).to(torch.float32)
        else:
            g = g + torch.tensor(wd, dtype=torch.float32) * p32
        b1f = torch.tensor(b1, dtype=torch.float32)
        b2f = torch.tensor(b2, dtype=torch.float32)
        m = exp_avgs[i].to(torch.float32)
        m = m + (1.0 - b1f) * (g - m)
        v = b2f * exp_avg_sqs[i].to(torch.float32) + (1.0 - b2f) * g * g
        vv = v
        if max_exp_avg_sqs[i] is not None:
            vmax = torch.maximum(max_exp_avg_sqs[i].to(torch.float32), v)
            max_exp_avg_sqs[i].copy_(torch.where(act, vmax, max_exp_avg_sqs[i]))
            vv = vmax
        denom = vv.sqrt() / bc2_sqrt + torch.tensor(eps, dtype=torch.float32)
        p32 = p32 - step_size * (m / denom)
        p.copy_(torch.where(act, p32.to(p.dtype), p))
        exp_avgs[i].copy_(torch.where(act, m.to(p.dtype), exp_avgs[i]))
        exp_avg_sqs[i].copy_(torch.where(act, v.to(p.dtype), exp_avg_sqs[i]))
        steps[i].copy_(new_step)
    clock.add_(act.to(clock.dtype))


def sgd_reference(params, grads, momentum_buffers, steps, group_index, groups: list[GroupHyper],
                  schedule: Schedule, clock: torch.Tensor, grad_mul: torch.Tensor | None = None,
                  active: torch.Tensor | None = None) -> None:
    """SGD step as ``torch.optim.SGD`` (momentum, dampening, nesterov, weight decay, maximize).

    ``momentum_buffers[i]`` is None where the group has no momentum; the first step copies
    ``d_p`` into the buffer, as torch does.
    """
    one = torch.ones((), dtype=torch.float64, device=clock.device)
    gm = one if grad_mul is None else grad_mul.to(torch.float64)
    act = torch.ones((), dtype=torch.bool, device=clock.device) if active is None else active
    inc = act.to(torch.float64)
    for i, p in enumerate(params):
        lr0, momentum, dampening, _, wd, maximize, nesterov, _ = groups[group_index[i]]
        lr = _schedule_lr(schedule, clock, lr0).to(torch.float32)
        sign = -1.0 if maximize else 1.0
        p32 = p.to(torch.float32)
        d = grads[i].to(torch.float32) * (sign * gm).to(torch.float32)
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
        p.copy_(torch.where(act, p32.to(p.dtype), p))
        steps[i].copy_(steps[i].to(torch.float64) + inc)
    clock.add_(act.to(clock.dtype))

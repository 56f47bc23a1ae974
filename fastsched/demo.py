"""A short tour of ``fastsched.schedules``: plot the main schedules, then train a small model.

Run ``python -m fastsched.demo [outdir]``. It writes ``outdir/schedules.png`` (needs the ``plot``
extra, matplotlib; without it the plot is skipped) and trains a 2-layer MLP on synthetic
regression data on the CPU for 300 steps with ``torch.optim.AdamW`` driven by
:class:`~fastsched.schedules.ScheduleLR`, printing the loss every 50 steps (a few seconds).
"""

from __future__ import annotations

import os
import sys

import torch

from fastsched.schedules import (
    REX,
    WSD,
    Cosine,
    Infinite,
    InverseSqrt,
    OneCycle,
    Rewarm,
    Schedule,
    ScheduleLR,
    plot,
)

__all__ = ["main", "main_schedules", "train"]


def main_schedules(total: int = 1000) -> dict[str, Schedule]:
    """The schedules the demo plots, over ``total`` steps with a 10% warmup."""
    w = total // 10
    return {
        "cosine, warmup, floor 0.1": Cosine(total, warmup_steps=w, min_ratio=0.1),
        "WSD, 1-sqrt cooldown (20%)": WSD(warmup_steps=w, total_steps=total, decay_fraction=0.2,
                                          decay_shape="1-sqrt"),
        "REX": REX(total, warmup_steps=w),
        "inverse sqrt": InverseSqrt(w),
        "one-cycle": OneCycle(total),
        "infinite, anneal at 80%": Infinite(w, 3 * w, 0.4, anneal_start=8 * w,
                                            anneal_steps=3 * w // 2, min_ratio=0.05),
        "re-warming, 2 cycles": Rewarm((total // 2, total // 2), peaks=(1.0, 0.7),
                                       warmup_steps=(w // 2, w // 2), min_ratio=0.1),
    }


def train(schedule: Schedule, steps: int = 300, lr: float = 3e-3, seed: int = 0,
          log_every: int = 50, verbose: bool = True) -> dict:
    """Fit a 2-layer MLP to a noisy nonlinear target with AdamW driven by ``schedule``.

    Returns ``{"losses": [...], "lrs": [...]}``, one entry per step. The global RNG is left as
    it was.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        x = torch.randn(512, 16)
        w_true = torch.randn(16, 1) / 4
        y = torch.sin(3 * x @ w_true) + 0.05 * torch.randn(512, 1)
        model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(),
                                    torch.nn.Linear(64, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = ScheduleLR(opt, schedule)
    losses, lrs = [], []
    for step in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if verbose and (step % log_every == 0 or step == steps - 1):
            print(f"  step {step:4d}  lr {lrs[-1]:.2e}  loss {losses[-1]:.4f}")
    return {"losses": losses, "lrs": lrs}


def main(outdir: str = "fastsched-demo", steps: int = 300, verbose: bool = True) -> dict:
    """Plot the main schedules into ``outdir/schedules.png`` and train a small model.

    Returns ``{"plot": path or None, "schedule": the training schedule, "losses": [...],
    "lrs": [...]}``.
    """
    os.makedirs(outdir, exist_ok=True)
    say = print if verbose else (lambda *a, **k: None)
    path: str | None = os.path.join(outdir, "schedules.png")
    try:
        plot(main_schedules(), path, steps=1100, title="fastsched schedules (multiplier of lr)")
        say(f"wrote {path}")
    except ImportError:
        path = None
        say("matplotlib is not installed (pip install 'fastsched[plot]'): no plot")

    sched = WSD(warmup_steps=steps // 10, total_steps=steps, decay_fraction=0.2,
                decay_shape="1-sqrt")
    say(f"training a 2-layer MLP with AdamW and ScheduleLR({sched!r})")
    result = train(sched, steps=steps, verbose=verbose)
    say(f"loss {result['losses'][0]:.4f} -> {result['losses'][-1]:.4f}")
    return {"plot": path, "schedule": sched, **result}


if __name__ == "__main__":
    main(*sys.argv[1:2])

"""AutoLRS choosing the learning rate of a small model while it trains (CPU, about a minute).

AutoLRS (Jin et al., ICLR 2021, arXiv 2105.10762) trains in stages of ``tau`` steps at one
constant learning rate. Before each stage it tries 10 learning rates for ``tau'`` steps each from
a checkpoint, forecasts each trial's loss ``tau`` steps ahead with ``a * exp(b x) + c``, picks the
next trial with a Gaussian process (LCB acquisition, log-uniform range), then restores the
checkpoint and trains ``tau`` steps at the best forecast. ``tau`` and ``tau'`` double after each
stage up to ``tau_max``.

Here: the 2-layer MLP of ``fastsched.tools.toy`` trained by ``fastsched.Adam``; the controller
sets ``param_groups[0]["lr"]`` between steps (no recompilation) and restores the model and the
optimizer in place. The forecast series is the loss on the fixed evaluation set. Prints every
stage's trials and the chosen schedule, and compares the final loss with two constant learning
rates trained for the same number of steps.

Run ``python examples/autolrs_demo.py [--steps 700] [--tau 100]``.
"""

from __future__ import annotations

import argparse

import torch

import fastsched
from fastsched.tools import AutoLRS
from fastsched.tools.toy import ToyTask


def _constant(lr: float, steps: int, seed: int) -> float:
    task = ToyTask(seed=seed)
    model = task.model()
    opt = fastsched.Adam(model.parameters(), lr=lr)
    step = task.train_step(model, opt)
    for _ in range(steps):
        step()
    return task.eval_loss(model)


def main(steps: int = 700, tau: int = 100, tau_max: int = 400, seed: int = 0,
         verbose: bool = True) -> dict:
    say = print if verbose else (lambda *a, **k: None)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small tensors: one thread is the fastest on a CPU
    try:
        task = ToyTask(seed=seed)
        model = task.model()
        opt = fastsched.Adam(model.parameters(), lr=1e-3)
        train = task.train_step(model, opt)

        def step():
            train()
            return task.eval_loss(model)

        ctl = AutoLRS(model, opt, step, min_lr=1e-4, max_lr=1e-1, tau=tau,
                      tau_prime=max(3, tau // 5), tau_max=tau_max, seed=seed)
        for stage in ctl.run(steps):
            tried = ", ".join(f"{lr:.1e}: {f:.3f}" for lr, f in sorted(stage.trials))
            say(f"stage at step {stage.start:4d} (tau' {stage.tau_prime}, tau {stage.tau}): "
                f"chose lr {stage.lr:.2e}, loss {stage.losses[0]:.4f} -> {stage.losses[-1]:.4f}")
            say(f"    trials (lr: forecast) {tried}")
        sched = ctl.schedule()
        final = task.eval_loss(model)
        say(f"chosen schedule {sched!r}:")
        for s in ctl.stages:
            say(f"  steps {s.start:4d}-{s.start + len(s.losses) - 1:4d}: lr {s.lr:.2e}")
        say(f"AutoLRS: final loss {final:.4f} after {ctl.step} steps "
            f"(+{ctl.trial_steps} trial steps, undone)")
        baselines = {lr: _constant(lr, ctl.step, seed) for lr in (1e-3, 1e-2)}
        for lr, loss in baselines.items():
            say(f"constant lr {lr:.0e}: final loss {loss:.4f}")
    finally:
        torch.set_num_threads(threads)
    return {"controller": ctl, "schedule": sched, "final": final, "baselines": baselines}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=700)
    ap.add_argument("--tau", type=int, default=100)
    ap.add_argument("--tau-max", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    main(a.steps, a.tau, a.tau_max, a.seed)

"""Draw ``docs/refine.png`` and ``docs/lawfit.png`` with the library (CPU, under a minute).

* ``refine.png``: a 2-layer MLP regression trained for 1,500 steps by ``fastsched.SGD``
  (momentum 0.9, constant lr 0.05) with ``history=1500``, so the optimizer logs the global
  gradient norm of every step on the device; ``fastsched.tools.plot_refined`` draws the log, its
  median-smoothed version and the schedule refined from it (Defazio et al., arXiv 2310.07831)
  against linear decay.
* ``lawfit.png``: ``examples/lawfit_predict.py``: the LR-annealing law (Tissue et al., arXiv
  2408.11029) fitted to a constant and a cosine run of the same model, and the WSD run it
  predicts, with the WSD run's measured loss overlaid.

Run ``python examples/make_tool_plots.py [--out docs]``.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
from pathlib import Path

import torch

import fastsched
from fastsched.tools import plot_refined, refine


def grad_norm_log(steps: int = 1500, lr: float = 0.05, seed: int = 0) -> dict:
    """The optimizer's own gradient-norm history of a constant-lr SGD run: a 2-layer MLP
    fitting ``sin(3 x.w) + noise`` from minibatches of 16 (the norms fall from the large
    residuals of the start, then rise as the minibatch noise takes over)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(16, 1, generator=g) / 4
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1)
            model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(),
                                        torch.nn.Linear(64, 1))
        opt = fastsched.SGD(model.parameters(), lr=lr, momentum=0.9, history=steps)
        for _ in range(steps):
            x = torch.randn(16, 16, generator=g)
            y = torch.sin(3 * x @ w) + 0.3 * torch.randn(16, 1, generator=g)
            loss = torch.nn.functional.mse_loss(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return opt.grad_norm_history()
    finally:
        torch.set_num_threads(threads)


def main(out: str = "docs", steps: int = 1500, lawfit_steps: int = 600,
         verbose: bool = True) -> dict:
    say = print if verbose else (lambda *a, **k: None)
    os.makedirs(out, exist_ok=True)
    hist = grad_norm_log(steps)
    sched = refine(hist)
    path_r = plot_refined(hist, os.path.join(out, "refine.png"),
                          title=f"Schedule refined from the gradient norms of a {steps}-step "
                                "SGD run (MLP regression)")
    peak = max(range(steps), key=sched)
    say(f"wrote {path_r}: {len(sched.steps)} knots, peak at step {peak}, "
        f"multiplier at 50% {sched(steps // 2):.3f}")

    spec = importlib.util.spec_from_file_location(
        "lawfit_predict", Path(__file__).resolve().parent / "lawfit_predict.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    path_l = os.path.join(out, "lawfit.png")
    r = mod.main(steps=lawfit_steps, plot=path_l, verbose=verbose)
    return {"refine": path_r, "lawfit": path_l, "schedule": sched, "history": hist,
            "lawfit_result": r}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="docs")
    main(ap.parse_args().out)

"""Predict a training run's final loss from two other runs with the LR-annealing scaling law.

Tissue et al. (arXiv 2408.11029) fit ``L(s) = L0 + A * S1^-alpha - C * S2`` (S1: the area under
the learning-rate curve; S2: the annealing area, a momentum of LR decreases) to one or two loss
curves and predict the loss curve of any other schedule with the same peak LR. Here, on the CPU
in a few seconds a run:

1. train a 2-layer MLP (``fastsched.tools.toy``: 4-class teacher with label noise, minibatches
   of 16, Adam at peak lr 1e-2) with a constant and a cosine schedule;
2. fit the law to those two evaluation-loss curves (``fastsched.tools.lawfit.fit``);
3. predict the WSD schedule (linear decay over the last 20%), then train it and compare;
4. rank a few candidate schedules by predicted final loss.

Run ``python examples/lawfit_predict.py [--steps 600] [--plot lawfit.png]``. One toy task and one
seed: the printed error is a measurement, not a guarantee.
"""

from __future__ import annotations

import argparse

from fastsched.schedules import REX, WSD, Cosine, LinearDecay
from fastsched.tools import lawfit
from fastsched.tools.toy import lawfit_experiment


def main(steps: int = 600, peak_lr: float = 1e-2, seed: int = 0, plot: str | None = None,
         verbose: bool = True) -> dict:
    say = print if verbose else (lambda *a, **k: None)
    r = lawfit_experiment(steps=steps, peak_lr=peak_lr, seed=seed)
    law = r["law"]
    say(f"fitted on constant + cosine ({steps} steps, peak lr {peak_lr:g}, lambda "
        f"{r['lam']:.4f}):")
    say(f"  L(s) = {law.L0:.4f} + {law.A:.4g} * S1^-{law.alpha:.3f} - {law.C:.4g} * S2   "
        f"(rms log residual {law.rmse_log:.4f})")
    for name, run in r["runs"].items():
        if name != "wsd":
            fitted = law.predict_lrs(run["lr"])[-1]
            say(f"  {name:9s} final loss {run['final']:.4f}   law {fitted:.4f}")
    say("WSD (20% linear cooldown), not seen by the fit:")
    say(f"  predicted final loss {r['predicted_final']:.4f}")
    say(f"  actual final loss    {r['actual_final']:.4f}   error {r['relative_error']:+.2%}")
    candidates = {"constant": r["schedules"]["constant"], "cosine": Cosine(steps),
                  "linear": LinearDecay(steps), "REX": REX(steps),
                  "WSD 10% 1-sqrt": WSD(total_steps=steps, decay_fraction=0.1),
                  "WSD 20% linear": r["schedules"]["wsd"],
                  "WSD 40% linear": WSD(total_steps=steps, decay_fraction=0.4,
                                        decay_shape="linear")}
    ranked = lawfit.rank(law, candidates, peak_lr, steps)
    say("candidates ranked by predicted final loss:")
    for i, (name, final) in enumerate(ranked, 1):
        say(f"  {i}. {name:15s} {final:.4f}")
    if plot:
        run = r["runs"]["wsd"]
        lawfit.plot(law, plot, curves=r["curves"], predicted={"WSD": r["schedules"]["wsd"]},
                    peak_lr=peak_lr, total_steps=steps,
                    actual={"WSD": (run["steps"], run["loss"])},
                    title=f"Loss law fitted on constant + cosine, WSD predicted "
                          f"({r['relative_error']:+.2%} at the end)")
        say(f"wrote {plot}")
    return {**r, "ranked": ranked}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--peak-lr", type=float, default=1e-2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--plot", default=None, help="write the fitted/predicted curves (PNG)")
    a = ap.parse_args()
    main(a.steps, a.peak_lr, a.seed, a.plot)

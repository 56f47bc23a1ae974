"""A tiny synthetic training task for the tools' examples and tests (CPU, a few ms a step).

A 2-layer MLP student learns a teacher: inputs ``x ~ N(0, diag(i^-1))`` in 32 dimensions
(a power-law spectrum, so progress is gradual rather than a single drop), labels drawn from
``softmax(3 * tanh(x W1) W2)`` over 4 classes (label noise puts an irreducible entropy under
the loss, the :math:`L_0` of a loss law), minibatches of 16 drawn afresh every step (gradient
noise, which annealing the learning rate removes). The loss reported is the cross-entropy on a
fixed evaluation set of 4,096 samples, so it is a smooth function of the parameters.

The task, the initialisation and the minibatch stream depend only on ``seed``: two runs that
differ only in their learning-rate schedule see the same data in the same order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..schedules import Schedule, ScheduleLR

__all__ = ["ToyTask", "train", "lawfit_experiment"]


@dataclass
class ToyTask:
    """The teacher, the evaluation set and seeded generators for the student and the batches."""

    seed: int = 0
    dim: int = 32
    classes: int = 4
    hidden: int = 64
    batch_size: int = 16
    eval_size: int = 4096

    def __post_init__(self):
        g = torch.Generator().manual_seed(self.seed)
        self._scale = torch.arange(1, self.dim + 1, dtype=torch.float32) ** -0.5
        self._w1 = torch.randn(self.dim, 128, generator=g)
        self._w2 = torch.randn(128, self.classes, generator=g) / 128 ** 0.5
        self.x_eval, self.y_eval = self._sample(self.eval_size, g)
        self.batches = torch.Generator().manual_seed(self.seed + 2)

    def _sample(self, n: int, gen: torch.Generator):
        x = torch.randn(n, self.dim, generator=gen) * self._scale
        logits = 3.0 * torch.tanh(x @ self._w1) @ self._w2
        y = torch.multinomial(torch.softmax(logits, -1), 1, generator=gen).squeeze(1)
        return x, y

    def model(self) -> torch.nn.Module:
        """A fresh student (the same initial weights for the same seed)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed + 1)
            return torch.nn.Sequential(torch.nn.Linear(self.dim, self.hidden), torch.nn.GELU(),
                                       torch.nn.Linear(self.hidden, self.classes))

    def batch(self):
        """The next minibatch of the stream."""
        return self._sample(self.batch_size, self.batches)

    @staticmethod
    def loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(model(x), y)

    @torch.no_grad()
    def eval_loss(self, model: torch.nn.Module) -> float:
        return float(self.loss(model, self.x_eval, self.y_eval))

    def train_step(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        """A closure for one step on the next batch: returns the (device) training loss."""
        def step() -> torch.Tensor:
            x, y = self.batch()
            loss = self.loss(model, x, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            return loss.detach()
        return step


def train(schedule: Schedule, steps: int, peak_lr: float, *, seed: int = 0,
          eval_every: int = 10, optimizer: str = "adam", threads: int | None = 1) -> dict:
    """Train the toy task for ``steps`` steps at ``peak_lr * schedule(t)``.

    ``optimizer``: ``"adam"`` (``torch.optim.Adam`` driven by
    :class:`~fastsched.schedules.ScheduleLR`; single-tensor loop, the fastest on a CPU for these
    small tensors) or ``"fastsched"`` (:class:`fastsched.Adam` with the schedule evaluated by the
    optimizer itself). Returns ``{"lr": per-step lrs, "steps": evaluation steps, "loss":
    evaluation losses, "final": last evaluation loss}``; the loss is evaluated after the update of
    every ``eval_every``-th step and after the last one. ``threads`` sets torch's CPU threads
    for the run (restored after).
    """
    task = ToyTask(seed=seed)
    model = task.model()
    if optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=peak_lr, foreach=False)
        sched = ScheduleLR(opt, schedule)
    elif optimizer == "fastsched":
        from ..optim import Adam

        opt = Adam(model.parameters(), lr=peak_lr, schedule=schedule)
        sched = None
    else:
        raise ValueError(f"optimizer must be 'adam' or 'fastsched', got {optimizer!r}")
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        step = task.train_step(model, opt)
        lrs = np.array([peak_lr * schedule(t) for t in range(steps)])
        ev_steps, ev = [], []
        for t in range(steps):
            step()
            if sched is not None:
                sched.step()
            if (t + 1) % eval_every == 0 or t == steps - 1:
                ev_steps.append(t)
                ev.append(task.eval_loss(model))
    finally:
        torch.set_num_threads(old_threads)
    return {"lr": lrs, "steps": np.array(ev_steps), "loss": np.array(ev), "final": ev[-1]}


def lawfit_experiment(steps: int = 600, peak_lr: float = 1e-2, *, seed: int = 0,
                      fit_on: tuple[str, ...] = ("constant", "cosine"),
                      predict: str = "wsd") -> dict:
    """Fit the LR-annealing law on toy runs and predict another schedule, then train it.

    Trains the toy task with the ``fit_on`` schedules, fits
    :func:`fastsched.tools.lawfit.fit` with :math:`\\lambda = 1 - 20/\\text{steps}` (the
    paper's 0.999 is 1 - 20/20,000: the same memory relative to the run), predicts the
    ``predict`` schedule's loss curve, trains it and compares. Schedules: ``constant``,
    ``cosine`` (to 0), ``wsd`` (linear decay over the last 20%), ``linear`` (to 0).

    Returns ``{"law", "schedules", "runs", "curves", "predicted", "predicted_final",
    "actual_final", "relative_error", "lam"}``.
    """
    from ..schedules import WSD, Constant, Cosine, LinearDecay
    from . import lawfit

    scheds = {"constant": Constant(1.0), "cosine": Cosine(steps),
              "wsd": WSD(total_steps=steps, decay_fraction=0.2, decay_shape="linear"),
              "linear": LinearDecay(steps)}
    for name in (*fit_on, predict):
        if name not in scheds:
            raise ValueError(f"unknown schedule {name!r}; expected one of {sorted(scheds)}")
    runs = {name: train(scheds[name], steps, peak_lr, seed=seed)
            for name in dict.fromkeys((*fit_on, predict))}
    curves = [lawfit.Curve(runs[n]["lr"], runs[n]["loss"], runs[n]["steps"], name=n)
              for n in fit_on]
    lam = 1.0 - 20.0 / steps
    law = lawfit.fit(curves, lam=lam)
    pred = law.predict(scheds[predict], peak_lr, steps)
    actual = runs[predict]["final"]
    return {"law": law, "schedules": scheds, "runs": runs, "curves": curves,
            "predicted": pred, "predicted_final": float(pred[-1]), "actual_final": actual,
            "relative_error": float(pred[-1] / actual - 1.0), "lam": lam}

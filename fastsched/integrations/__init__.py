"""Glue for training frameworks: HF Trainer / accelerate, Lightning, PEFT.

* :func:`unwrap`: the fastsched optimizer inside accelerate's ``AcceleratedOptimizer`` (what
  ``Trainer.optimizer`` is during training) or Lightning's ``LightningOptimizer``, so
  ``unwrap(trainer.optimizer).stats_dict()``, ``.clock`` and ``.current_lr()`` work;
* :class:`ScheduleAdapter`: a ``torch.optim.lr_scheduler.LRScheduler`` face of the optimizer's
  own schedule: ``get_last_lr()`` is the learning rate applied, ``step()`` changes nothing.
  Give it where a framework wants a scheduler (HF ``Trainer(optimizers=(opt, adapter))``,
  Lightning's ``"lr_scheduler"``), so the framework neither builds a second schedule that would
  multiply with the optimizer's nor logs the base lr as the learning rate;
* :func:`applied_lr`: the learning rate of each group at the last step, as applied;
* :mod:`fastsched.integrations.hf`: ``FastschedCallback`` and ``attach(trainer)`` for the HF
  Trainer (needs ``transformers``);
* :mod:`fastsched.integrations.pl`: ``FastschedMonitor``, a Lightning callback (needs
  ``lightning`` or ``pytorch_lightning``).

The frameworks themselves are imported only by the submodules that need them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.optim.lr_scheduler import LRScheduler

from ..optim import FusedOptimizer

__all__ = ["unwrap", "find_fused", "ScheduleAdapter", "applied_lr", "step_stats"]

# wrapper attributes, in the order they are tried: Lightning's LightningOptimizer (a subclass
# of the wrapped class that copies its __dict__: its attributes go stale), accelerate's
# AcceleratedOptimizer, DeepSpeed-style and other ``.optimizer`` holders
_INNER = ("_optimizer", "optimizer")


def find_fused(opt: Any) -> FusedOptimizer | None:
    """The fastsched optimizer inside ``opt`` (through any chain of wrappers), else None."""
    for _ in range(16):
        inner = None
        for name in _INNER:
            inner = vars(opt).get(name) if hasattr(opt, "__dict__") else None
            if inner is not None and inner is not opt:
                break
            inner = None
        if inner is None:
            return opt if isinstance(opt, FusedOptimizer) else None
        opt = inner
    return None


def unwrap(opt: Any) -> FusedOptimizer:
    """The fastsched optimizer inside a framework's wrapper (accelerate's
    ``AcceleratedOptimizer``, i.e. HF ``Trainer.optimizer``; Lightning's
    ``LightningOptimizer``, i.e. ``LightningModule.optimizers()``), or ``opt`` itself.

    Raises ``TypeError`` when there is none (a ``torch.optim`` optimizer, say)."""
    fused = find_fused(opt)
    if fused is None:
        raise TypeError(f"no fastsched optimizer inside {type(opt).__qualname__} (looked "
                        f"through the attributes {', '.join(_INNER)})")
    return fused


def applied_lr(opt: Any) -> list[float]:
    """The learning rate of each group at the optimizer's last step, as applied (base x
    schedule); before the first step, the lr of the first step. Synchronises once.

    With the statistics pass on (``stats``, ``max_grad_norm``, ``history`` or ``nonfinite``)
    this is the value the step wrote; otherwise it is recomputed from the clock (the clock of
    a step skipped for non-finite gradients did not advance)."""
    fused = unwrap(opt)
    if fused.options.stats_pass:
        st = fused.stats
        if st:
            return [float(v) for v in st["lr"].cpu()]
    t = int(fused.clock.item())
    f = fused.schedule(max(t - 1, 0))
    return [fused._check_lr(g["lr"]) * f for g in fused.param_groups]


def step_stats(opt: Any) -> dict[str, torch.Tensor]:
    """Device tensors of the last step (no synchronisation): ``lr`` (per group, as applied),
    and with the statistics pass on ``grad_norm`` (before clipping), ``clip_coef`` and
    ``skip_count`` (steps skipped for non-finite gradients so far). Empty before the first
    step, or when ``opt`` holds no fastsched optimizer. Each tensor is a copy (the next step
    overwrites the optimizer's buffers)."""
    fused = find_fused(opt)
    if fused is None:
        return {}
    if fused.options.stats_pass:
        st = fused.stats
        if not st:
            return {}
        return {k: st[k].detach().clone() for k in ("lr", "grad_norm", "clip_coef",
                                                      "skip_count")}
    t = fused.clock.detach().clamp(min=1) - 1
    lrs = [fused.schedule.evaluate(t) * fused._check_lr(g["lr"]) for g in fused.param_groups]
    return {"lr": torch.cat([x.reshape(1).to(torch.float64) for x in lrs])}


class ScheduleAdapter(LRScheduler):
    """``LRScheduler`` face of a fastsched optimizer's own schedule.

    ``get_last_lr()`` is the learning rate of each group at the optimizer's last step, as
    applied (``base x schedule``; before the first step, that of the first step); ``step()``
    changes nothing (the optimizer advances its schedule on the device itself), and
    ``state_dict()`` holds nothing (the schedule and its clock are in the optimizer's).

    Example (HF Trainer: no second schedule, and the logged ``learning_rate`` is the applied
    one)::

        opt = fastsched.AdamW(model.parameters(), lr=3e-3,
                              schedule=Cosine(total_steps=1000, warmup_steps=50))
        trainer = Trainer(model, args, train_dataset=ds,
                          optimizers=(opt, fastsched.ScheduleAdapter(opt)))

    ``optimizer`` may be a wrapper (accelerate, Lightning); it is kept as given, as a torch
    scheduler keeps it, and the fastsched optimizer inside is found with :func:`unwrap`.
    """

    def __init__(self, optimizer: Any, last_epoch: int = -1):
        # LRScheduler.__init__ would write group["lr"] and "initial_lr": not called
        self.optimizer = optimizer
        self.fused = unwrap(optimizer)
        self.last_epoch = last_epoch + 1
        self._step_count = 1
        self.base_lrs = [self.fused._check_lr(g["lr"]) for g in self.fused.param_groups]
        self._last_lr = None

    def get_lr(self) -> list[float]:
        return applied_lr(self.fused)

    def get_last_lr(self) -> list[float]:
        """The learning rate of each group at the optimizer's last step, as applied
        (synchronises once)."""
        self._last_lr = applied_lr(self.fused)
        return self._last_lr

    def step(self, epoch=None) -> None:
        """Changes nothing: the optimizer's clock advances with each step it takes."""
        self._step_count += 1
        self.last_epoch += 1

    def state_dict(self) -> dict[str, Any]:
        return {"last_epoch": self.last_epoch, "_step_count": self._step_count}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_epoch = int(state_dict.get("last_epoch", self.last_epoch))
        self._step_count = int(state_dict.get("_step_count", self._step_count))

    def __repr__(self) -> str:
        return f"ScheduleAdapter({self.fused.schedule!r})"

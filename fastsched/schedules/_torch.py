"""Drive any ``torch.optim`` optimizer with a fastsched schedule."""

from __future__ import annotations

import torch
from torch.optim.lr_scheduler import LRScheduler

from ._base import Schedule

__all__ = ["ScheduleLR"]


class ScheduleLR(LRScheduler):
    """A ``torch.optim.lr_scheduler.LRScheduler`` whose multiplier is a fastsched schedule.

    ``lr = base_lr * schedule(last_epoch)`` for every parameter group, exactly as
    ``LambdaLR(optimizer, schedule)`` would compute it, but the schedule is part of
    ``state_dict()`` (as a dict), so a checkpoint restores both the clock and the curve.
    Works with any torch optimizer; tensor learning rates are updated in place with ``fill_``.

    Example::

        opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
        sched = ScheduleLR(opt, fastsched.schedules.Cosine(total_steps=1000, warmup_steps=100))
        for batch in data:
            loss(batch).backward(); opt.step(); opt.zero_grad(); sched.step()
    """

    def __init__(self, optimizer: torch.optim.Optimizer, schedule: Schedule,
                 last_epoch: int = -1):
        if not isinstance(schedule, Schedule):
            raise ValueError(f"schedule must be a fastsched Schedule, got {schedule!r}")
        self.schedule = schedule
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        f = self.schedule(max(self.last_epoch, 0))
        return [base * f for base in self.base_lrs]

    def _get_closed_form_lr(self) -> list[float]:
        return self.get_lr()

    def state_dict(self) -> dict:
        state = {k: v for k, v in self.__dict__.items() if k not in ("optimizer", "schedule")}
        state["schedule"] = self.schedule.to_dict()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        from ._base import from_dict

        state = dict(state_dict)
        sched = state.pop("schedule", None)
        self.__dict__.update(state)
        if sched is not None:
            self.schedule = from_dict(sched)

"""Plot schedules with matplotlib (the ``plot`` extra)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from ._base import Schedule

__all__ = ["plot"]


def plot(schedules: Schedule | Sequence[Schedule] | Mapping[str, Schedule], path: str,
         *, steps: int | None = None, points: int = 2000, title: str | None = None,
         mark_phases: bool = True, base_lr: float = 1.0, logy: bool = False) -> str:
    """Plot one or several schedules on one figure and write a PNG to ``path``.

    ``schedules`` is a schedule, a list, or a ``{label: schedule}`` mapping (a schedule's label is
    otherwise its repr). ``steps`` is the x range (default: 10% past the longest bounded
    schedule, or 1000). Phase boundaries are drawn as dotted vertical lines in each curve's
    colour. ``base_lr`` multiplies every curve; ``logy`` uses a log scale. Returns ``path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if isinstance(schedules, Schedule):
        items = [(repr(schedules), schedules)]
    elif isinstance(schedules, Mapping):
        items = list(schedules.items())
    else:
        items = [(repr(s), s) for s in schedules]
    if not items:
        raise ValueError("schedules must name at least one schedule")
    for label, s in items:
        if not isinstance(s, Schedule):
            raise ValueError(f"{label!r} is not a fastsched Schedule: {s!r}")
    if steps is None:
        ends = [s.end_step for _, s in items if math.isfinite(s.end_step)]
        steps = int(max(ends) * 1.1) if ends and max(ends) > 0 else 1000
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    t = torch.unique(torch.linspace(0, steps, min(points, steps + 1)).round().long())
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    for label, s in items:
        (line,) = ax.plot(t.numpy(), (base_lr * s.evaluate(t)).numpy(), label=label, lw=1.6)
        if mark_phases:
            for b in s.phase_boundaries():
                if b <= steps:
                    ax.axvline(b, color=line.get_color(), ls=":", lw=0.8, alpha=0.7)
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate" if base_lr != 1.0 else "multiplier of base lr")
    if logy:
        ax.set_yscale("log")
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path

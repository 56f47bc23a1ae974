"""Device buffers that outlive a parameter set: the clock, the group table, the option table,
the statistics and the ring buffer (layouts in ``fastsched.kernels.layout``)."""

from __future__ import annotations

import torch

from ..kernels import layout as L
from ._tables import h2d

__all__ = ["StepBuffers"]


class StepBuffers:
    """Device buffers that outlive a parameter set: the clock, the group table, the option
    table, the statistics and the ring buffer. Each ``refresh_*`` rewrites its table only when
    its host value changed (one small pinned copy), so the step reads one source per option."""

    def __init__(self, device, n_groups: int, history: int, clock: int = 0):
        self.device = torch.device(device)
        self.clock = torch.full((1,), clock, dtype=torch.int64, device=device)
        self.gstat = torch.zeros(L.STAT_COLS, dtype=torch.float64, device=device)
        self.lr = torch.zeros(n_groups, dtype=torch.float64, device=device)
        self.history_len = history
        self.history = torch.zeros((max(history, 1), L.H_COLS), dtype=torch.float64,
                                   device=device)
        self.history_pos = torch.zeros(1, dtype=torch.int64, device=device)
        self.groups: torch.Tensor | None = None
        self.group_rows: tuple | None = None
        self.config: torch.Tensor | None = None
        self.config_row: tuple | None = None

    def refresh_groups(self, rows: tuple) -> torch.Tensor:
        if rows != self.group_rows:
            self.groups = h2d(torch.tensor(rows, dtype=torch.float64), self.device)
            self.group_rows = rows
            if self.lr.numel() != len(rows):
                self.lr = torch.zeros(len(rows), dtype=torch.float64, device=self.device)
        return self.groups

    def refresh_config(self, max_grad_norm: float | None) -> torch.Tensor:
        row = [0.0] * L.CFG_COLS
        row[L.CFG_MAX_GRAD_NORM] = max_grad_norm or 0.0
        row = tuple(row)
        if row != self.config_row:
            self.config = h2d(torch.tensor(row, dtype=torch.float64), self.device)
            self.config_row = row
        return self.config

    def moved(self, device, history: int) -> StepBuffers:
        """The buffers on another device (the model moved) or with another ring-buffer length
        (the ring buffer starts empty then)."""
        new = StepBuffers(device, self.lr.numel(), history)
        new.clock = self.clock.to(device)
        new.gstat = self.gstat.to(device)
        if history == self.history_len:
            new.history = self.history.to(device)
            new.history_pos = self.history_pos.to(device)
        return new

"""Lightning with a scheduled fastsched optimizer: FastschedMonitor logs the applied lr and the
optimizer's statistics, ScheduleAdapter is accepted as the lr_scheduler, unwrap reaches the
optimizer through LightningOptimizer."""

from __future__ import annotations

import pytest
import torch

import fastsched
from fastsched.schedules import Cosine

pl = pytest.importorskip("lightning.pytorch")
FastschedMonitor = pytest.importorskip("fastsched.integrations.pl").FastschedMonitor

STEPS = 6
LR = 1e-2
SCHED = Cosine(total_steps=STEPS, warmup_steps=2, min_ratio=0.1)


class _Logger(pl.loggers.Logger):
    def __init__(self):
        super().__init__()
        self.rows = []

    @property
    def name(self):
        return "mem"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.rows.append((step, dict(metrics)))


class _Module(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(),
                                       torch.nn.Linear(8, 2))
        self.seen = []

    def training_step(self, batch, batch_idx):
        wrapped = self.optimizers()
        assert type(wrapped).__name__.startswith("Lightning")
        self.seen.append(fastsched.unwrap(wrapped))
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        opt = fastsched.AdamW(self.parameters(), lr=LR, schedule=SCHED, max_grad_norm=0.5,
                              backend="reference")
        return {"optimizer": opt,
                "lr_scheduler": {"scheduler": fastsched.ScheduleAdapter(opt),
                                 "interval": "step"}}


def test_lightning_monitor_logs_the_applied_lr():
    g = torch.Generator().manual_seed(2)
    data = torch.utils.data.TensorDataset(torch.randn(STEPS * 4, 6, generator=g),
                                          torch.randn(STEPS * 4, 2, generator=g))
    module = _Module()
    logger = _Logger()
    lr_monitor = pl.callbacks.LearningRateMonitor(logging_interval="step")
    trainer = pl.Trainer(max_steps=STEPS, logger=logger, log_every_n_steps=1,
                         accelerator="cpu", devices=1, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[FastschedMonitor(), lr_monitor])
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=4))

    opt = trainer.optimizers[0]
    assert all(o is opt for o in module.seen) and int(opt.clock.item()) == STEPS
    rows = [m for _, m in logger.rows if "fastsched/lr" in m]
    assert [m["fastsched/lr"] for m in rows] == pytest.approx(
        [LR * SCHED(k) for k in range(STEPS)], rel=1e-12)
    assert all(m["fastsched/grad_norm"] > 0 and m["fastsched/skipped_steps"] == 0
               for m in rows)
    assert [m["fastsched/clip_coef"] for m in rows] == pytest.approx(
        [min(1.0, 0.5 / (m["fastsched/grad_norm"] + 1e-6)) for m in rows], rel=1e-5)
    # LearningRateMonitor reads param_groups[0]["lr"]: the base, flat (why the monitor exists)
    base = [m["lr-AdamW"] for _, m in logger.rows if "lr-AdamW" in m]
    assert base and set(base) == {LR}

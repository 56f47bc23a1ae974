"""Lightning glue: :class:`FastschedMonitor` logs the applied learning rate and the optimizer's
statistics of each step.

Lightning's ``LearningRateMonitor`` logs ``param_groups[i]["lr"]``, which for a fastsched
optimizer with ``schedule=`` is the base lr, not the one applied: use this callback instead::

    def configure_optimizers(self):
        opt = fastsched.AdamW(self.parameters(), lr=3e-3, max_grad_norm=1.0,
                              schedule=Cosine(total_steps=1000, warmup_steps=50))
        return {"optimizer": opt, "lr_scheduler": fastsched.ScheduleAdapter(opt)}

    trainer = L.Trainer(callbacks=[FastschedMonitor()], precision="bf16-mixed")

Clip with the optimizer's ``max_grad_norm=`` rather than ``gradient_clip_val``: under mixed
precision Lightning refuses ``gradient_clip_val`` for optimizers that unscale the gradients
themselves, as fastsched's do. Needs ``lightning`` (or ``pytorch_lightning``).
"""

from __future__ import annotations

try:
    from lightning.pytorch import Callback
except ImportError:  # the standalone package
    from pytorch_lightning import Callback

from . import find_fused, step_stats

__all__ = ["FastschedMonitor"]


class FastschedMonitor(Callback):
    """Logs, after each training batch, the fastsched optimizers' statistics of their last
    step through ``LightningModule.log`` (so ``log_every_n_steps`` and every logger apply):
    ``lr`` (applied, group 0; ``lr/pg{i}`` for the others) and, with the statistics pass on
    (``max_grad_norm``, ``stats``, ``history`` or ``nonfinite``), ``grad_norm`` (global L2
    before clipping), ``clip_coef`` and ``skipped_steps``. Names are prefixed with
    ``prefix`` (default ``"fastsched/"``) and, for a second optimizer, ``opt{k}/``. The values
    stay on the device until Lightning logs them. Optimizers that are not fastsched ones are
    left out.
    """

    def __init__(self, prefix: str = "fastsched/", prog_bar: bool = False):
        super().__init__()
        self.prefix = prefix
        self.prog_bar = prog_bar

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        metrics = {}
        for k, opt in enumerate(trainer.optimizers):
            if find_fused(opt) is None:
                continue
            st = step_stats(opt)
            if not st:
                continue
            pre = self.prefix + (f"opt{k}/" if k else "")
            lr = st.pop("lr")
            metrics[pre + "lr"] = lr[0]
            metrics.update({f"{pre}lr/pg{i}": lr[i] for i in range(1, lr.numel())})
            if "grad_norm" in st:
                metrics[pre + "grad_norm"] = st["grad_norm"]
                metrics[pre + "clip_coef"] = st["clip_coef"]
                metrics[pre + "skipped_steps"] = st["skip_count"]
        if metrics:
            pl_module.log_dict(metrics, on_step=True,
                               on_epoch=False, prog_bar=self.prog_bar, logger=True)

"""HF Trainer glue: a callback that logs the optimizer's statistics, and :func:`attach`.

Use with a fastsched optimizer that has a schedule::

    opt = fastsched.AdamW(model.parameters(), lr=3e-3, max_grad_norm=1.0,
                          schedule=Cosine(total_steps=1000, warmup_steps=50))
    args = TrainingArguments(..., max_grad_norm=0)       # fastsched clips (and measures)
    trainer = Trainer(model, args, train_dataset=ds,
                      optimizers=(opt, fastsched.ScheduleAdapter(opt)))
    fastsched.integrations.hf.attach(trainer)

Needs ``transformers``.
"""

from __future__ import annotations

import warnings
from typing import Any

from transformers import TrainerCallback

from . import find_fused, step_stats

__all__ = ["FastschedCallback", "attach"]


def _host_stats(opt) -> dict[str, float]:
    st = step_stats(opt)
    if not st:
        return {}
    lr = st["lr"].cpu().tolist()
    out: dict[str, float] = {"learning_rate": lr[0]}
    out.update({f"learning_rate_pg{i}": v for i, v in enumerate(lr) if i})
    if "grad_norm" in st:
        gn, cc, sk = (float(st[k]) for k in ("grad_norm", "clip_coef", "skip_count"))
        out.update(grad_norm=gn, clip_coef=cc, skipped_steps=int(sk))
    return out


class FastschedCallback(TrainerCallback):
    """Adds the fastsched optimizer's statistics of the last step to each training log of the
    Trainer: ``learning_rate`` (the lr applied, group 0; ``learning_rate_pg{i}`` for the other
    groups), and with the statistics pass on (``max_grad_norm``, ``stats``, ``history`` or
    ``nonfinite``) ``grad_norm`` (global L2 norm before clipping), ``clip_coef`` and
    ``skipped_steps`` (steps skipped for non-finite gradients so far). One synchronisation per
    log. Values the Trainer computed itself under these names are replaced.

    Callbacks run in order: ``attach(trainer)`` puts this one first, so that the reporting
    callbacks (TensorBoard, W&B, ...) see its values; ``Trainer(callbacks=[...])`` and
    ``trainer.add_callback`` put it after them (``trainer.state.log_history`` has the values
    either way). Does nothing for an optimizer that is not a fastsched one.
    """

    def on_log(self, args, state, control, logs=None, optimizer=None, **kwargs):
        if logs is None or "loss" not in logs or optimizer is None:
            return  # an evaluation or end-of-training log
        extra = _host_stats(optimizer)
        if not extra:
            return
        logs.update(extra)
        if state.log_history and state.log_history[-1].get("step") == state.global_step \
                and "loss" in state.log_history[-1]:
            state.log_history[-1].update(extra)


def attach(trainer, callback: FastschedCallback | None = None,
           norm_pass: bool | None = None) -> FastschedCallback:
    """Set a Trainer up for its fastsched optimizer: insert :class:`FastschedCallback` first
    among its callbacks (reporters see its values), and turn the Trainer's own gradient-norm
    pass off when the optimizer measures the norm itself.

    The Trainer clips when ``TrainingArguments.max_grad_norm > 0``; with ``max_grad_norm=0`` it
    still runs a norm pass (``clip_grad_norm_(..., inf)``, transformers 5) only to log
    ``grad_norm``. ``norm_pass=None`` (default) turns that pass off when the optimizer's
    statistics pass is on and ``max_grad_norm`` is 0 in the arguments (the callback logs the
    optimizer's ``grad_norm`` instead); ``True`` keeps it, ``False`` turns it off regardless.
    Warns when both the Trainer and the optimizer clip (the optimizer would see clipped
    gradients). Returns the callback.
    """
    cb = callback or FastschedCallback()
    handler = trainer.callback_handler
    handler.callbacks[:] = [c for c in handler.callbacks if c is not cb]
    handler.callbacks.insert(0, cb)
    fused = find_fused(trainer.optimizer) if trainer.optimizer is not None else None
    trainer_clip = trainer.args.max_grad_norm is not None and trainer.args.max_grad_norm > 0
    if fused is not None and trainer_clip and fused.max_grad_norm is not None:
        warnings.warn(f"both the Trainer (max_grad_norm={trainer.args.max_grad_norm}) and the "
                      f"optimizer (max_grad_norm={fused.max_grad_norm}) clip; set "
                      "max_grad_norm=0 in TrainingArguments to clip once, in the optimizer",
                      stacklevel=2)
    if norm_pass is None:
        norm_pass = not (fused is not None and fused.options.stats_pass and not trainer_clip)
    if not norm_pass:
        if trainer_clip:
            raise ValueError("norm_pass=False needs max_grad_norm=0 in TrainingArguments (the "
                             "Trainer's clipping is its norm pass); clip with the optimizer's "
                             "max_grad_norm= instead")
        if not hasattr(trainer, "_get_grad_norm"):
            warnings.warn("this transformers version has no Trainer._get_grad_norm: its "
                          "gradient-norm pass is left as it is", stacklevel=2)
        else:
            trainer._get_grad_norm = _no_norm_pass
    return cb


def _no_norm_pass(model: Any, grad_norm: Any = None) -> Any:
    """Trainer._get_grad_norm without the pass: the callback logs the optimizer's norm."""
    return grad_norm

"""The functional fused step: one function per optimizer kind, every backend behind it.

As torch's ``torch.optim.adam.adam`` / ``sgd.sgd``, hyperparameters are keyword arguments (here a
number for every parameter group or a sequence with one value per group) and the features of
the step are keywords too; the tensors come as a :class:`~fastsched.optim._tables.Plan` (the
cached tables of the table builder) and its :class:`~fastsched.optim._buffers.StepBuffers`
(clock, statistics), not as lists rebuilt every call. Both backends fill the same buffers, so
:func:`fastsched.optim._stats.stats_tensors` decodes them whichever ran.

Passes: with the statistics pass (see :class:`StepOptions`) a pass over the gradients and a
per-tensor reduce, then the finalize pass (schedule, clip coefficient, skip flag, per-tensor
scalars in float64) and one update launch per (dtype, update variant) bucket.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..kernels import layout as L
from . import _reference
from ._tables import DEFAULT_BLOCK, RUN_ELEMENTS

__all__ = ["StepOptions", "NONFINITE", "ALLORA_APPLY", "adam", "sgd", "adam_row", "sgd_row",
           "run_step"]

NONFINITE = ("skip", "raise", "ignore")


@dataclass(frozen=True)
class StepOptions:
    """The options of a fused step other than the hyperparameters, validated on construction.

    * ``max_grad_norm``: clip by the global L2 norm (``clip_grad_norm_``); None: no clipping.
    * ``stats``: per-tensor parameter norms and update RMS from the update pass (two float
      atomics per block) on top of the global statistics.
    * ``nonfinite``: ``"skip"`` | ``"raise"`` | ``"ignore"``, or None: ``"skip"`` when
      clipping, ``stats`` or ``history`` is on, else ``"ignore"`` (torch semantics).
    * ``history``: length of the device ring buffer of global norms (0: none).

    The statistics pass (one more read of every gradient: 4 B / fp32 parameter, two launches)
    runs when clipping, ``stats``, ``history`` or the guard (``nonfinite`` other than
    ``"ignore"``) is on; without it a step is the finalize launch and the update launches.
    """

    max_grad_norm: float | None = None
    stats: bool = False
    nonfinite: str | None = None
    history: int = 0

    def __post_init__(self):
        m = self.max_grad_norm
        if m is not None and (isinstance(m, bool) or not isinstance(m, int | float)
                              or not math.isfinite(m) or m <= 0):
            raise ValueError(f"max_grad_norm must be a finite number > 0 or None, got {m!r}")
        if m is not None:
            object.__setattr__(self, "max_grad_norm", float(m))
        if not isinstance(self.stats, bool):
            raise ValueError(f"stats must be a bool, got {self.stats!r}")
        if self.nonfinite is not None and self.nonfinite not in NONFINITE:
            raise ValueError(f"nonfinite must be one of {list(NONFINITE)} or None, got "
                             f"{self.nonfinite!r}")
        h = self.history
        if isinstance(h, bool) or not isinstance(h, int) or h < 0:
            raise ValueError(f"history must be an integer >= 0 (0: no ring buffer), got {h!r}")

    @property
    def mode(self) -> str:
        """The non-finite mode in effect (``nonfinite=None`` resolved)."""
        if self.nonfinite is not None:
            return self.nonfinite
        return "skip" if (self.max_grad_norm is not None or self.stats or self.history) \
            else "ignore"

    @property
    def guard(self) -> bool:
        return self.mode != "ignore"

    @property
    def stats_pass(self) -> bool:
        """Whether the statistics pass runs (global norms, clip coefficient, guard)."""
        return self.max_grad_norm is not None or self.stats or self.history > 0 or self.guard


def _per_group(name: str, value, n: int) -> list:
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} values for {n} parameter groups")
        return list(value)
    return [value] * n


def _n_groups(**values) -> int:
    lens = {k: len(v) for k, v in values.items()
            if isinstance(v, Sequence) and not isinstance(v, str)}
    if len(set(lens.values())) > 1:
        raise ValueError(f"per-group hyperparameters of different lengths: {lens}")
    return next(iter(lens.values()), 1)


#: where ALLoRA's unit scale goes: the unit's step ("update": an adaptive per-unit learning rate
#: that Adam's normalisation cannot undo) or its gradient ("grad")
ALLORA_APPLY = ("update", "grad")


def _row(lr, weight_decay, maximize, allora_eta, allora_apply) -> list[float]:
    r = [0.0] * L.G_COLS
    r[L.G_LR] = float(lr)
    r[L.G_WEIGHT_DECAY] = float(weight_decay)
    r[L.G_MAXIMIZE] = float(bool(maximize))
    r[L.G_INV_ETA2] = 0.0 if allora_eta is None else 1.0 / float(allora_eta) ** 2
    if allora_apply not in ALLORA_APPLY:
        raise ValueError(f"allora_apply must be one of {list(ALLORA_APPLY)}, got "
                         f"{allora_apply!r}")
    r[L.G_ALLORA_UPDATE] = float(allora_apply == "update")
    return r


def adam_row(lr, beta1, beta2, eps, weight_decay, amsgrad, maximize, decoupled_weight_decay,
             allora_eta, allora_apply="update") -> tuple[float, ...]:
    """One parameter group's row of the groups table for Adam / AdamW."""
    r = _row(lr, weight_decay, maximize, allora_eta, allora_apply)
    r[L.G_ADAM_BETA1] = float(beta1)
    r[L.G_ADAM_BETA2] = float(beta2)
    r[L.G_ADAM_EPS] = float(eps)
    r[L.G_ADAM_AMSGRAD] = float(bool(amsgrad))
    r[L.G_ADAM_DECOUPLED] = float(bool(decoupled_weight_decay))
    return tuple(r)


def sgd_row(lr, momentum, dampening, weight_decay, nesterov, maximize,
            allora_eta, allora_apply="update") -> tuple[float, ...]:
    """One parameter group's row of the groups table for SGD."""
    r = _row(lr, weight_decay, maximize, allora_eta, allora_apply)
    r[L.G_SGD_MOMENTUM] = float(momentum)
    r[L.G_SGD_DAMPENING] = float(dampening)
    r[L.G_SGD_NESTEROV] = float(bool(nesterov))
    return tuple(r)


def adam(plan, buffers, *, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False,
         maximize=False, decoupled_weight_decay=False, allora_eta=None, allora_apply="update",
         schedule,
         options: StepOptions = StepOptions(), grads=None, grad_scale=None, found_inf=None,
         backend: str = "triton") -> None:
    """One Adam / AdamW step (torch.optim.Adam(W), ``fused=True`` semantics) over ``plan``.

    Each hyperparameter is a number or one value per parameter group (``betas``: a pair or a
    sequence of pairs). ``grads`` (this step's gradients in row order) is needed by the
    reference backend only; ``grad_scale`` / ``found_inf`` are torch.amp.GradScaler's.
    """
    per_group_betas = bool(betas) and isinstance(betas[0], Sequence)
    kw = dict(lr=lr, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
              decoupled_weight_decay=decoupled_weight_decay, allora_eta=allora_eta,
              allora_apply=allora_apply)
    n = _n_groups(**kw, **({"betas": betas} if per_group_betas else {}))
    cols = {k: _per_group(k, v, n) for k, v in kw.items()}
    pairs = _per_group("betas", betas, n) if per_group_betas else [betas] * n
    rows = tuple(adam_row(cols["lr"][i], pairs[i][0], pairs[i][1], cols["eps"][i],
                          cols["weight_decay"][i], cols["amsgrad"][i], cols["maximize"][i],
                          cols["decoupled_weight_decay"][i], cols["allora_eta"][i],
                          cols["allora_apply"][i])
                 for i in range(n))
    run_step(plan, buffers, rows, schedule=schedule, options=options, grads=grads,
             grad_scale=grad_scale, found_inf=found_inf, backend=backend)


def sgd(plan, buffers, *, lr, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
        maximize=False, allora_eta=None, allora_apply="update", schedule,
        options: StepOptions = StepOptions(),
        grads=None, grad_scale=None, found_inf=None, backend: str = "triton") -> None:
    """One SGD step (torch.optim.SGD semantics: momentum, dampening, nesterov, weight decay,
    maximize; the first step copies d_p into the buffer) over ``plan``; see :func:`adam`."""
    kw = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
              nesterov=nesterov, maximize=maximize, allora_eta=allora_eta,
              allora_apply=allora_apply)
    n = _n_groups(**kw)
    cols = {k: _per_group(k, v, n) for k, v in kw.items()}
    rows = tuple(sgd_row(*(cols[k][i] for k in kw)) for i in range(n))
    run_step(plan, buffers, rows, schedule=schedule, options=options, grads=grads,
             grad_scale=grad_scale, found_inf=found_inf, backend=backend)


def _scaler(grad_scale, found_inf):
    if grad_scale is not None:
        gs = grad_scale.reshape(-1)
        return gs, (found_inf.reshape(-1) if found_inf is not None else torch.zeros_like(gs))
    if found_inf is not None:
        # after an explicit scaler.unscale_(opt), GradScaler.step sets grad_scale = None but
        # found_inf still decides the skip
        fi = found_inf.reshape(-1)
        return torch.ones_like(fi), fi
    return None, None


def run_step(plan, buffers, rows: tuple, *, schedule, options: StepOptions, grads=None,
             grad_scale=None, found_inf=None, backend: str = "triton") -> None:
    """The passes of one step for group rows ``rows`` (``G_COLS`` floats per group)."""
    if rows is not plan.l2_rows:
        _check_l2(plan, rows)
    groups = buffers.refresh_groups(rows)
    cfg = buffers.refresh_config(options.max_grad_norm)
    table = schedule.table(plan.device)
    gs, fi = _scaler(grad_scale, found_inf)
    if backend == "triton":
        _run_triton(plan, buffers, groups, cfg, table, options, gs, fi)
        return
    if backend == "cpu":
        from . import _cpu

        _cpu.run_step(plan, buffers, rows, table, options, gs, fi)
        return
    if grads is None:
        raise ValueError("grads: the reference backend needs this step's gradients")
    reduce = plan.dist.reduce_rows if plan.dist is not None else None
    if options.stats_pass:
        _reference.grad_sums(grads, plan.tstat, guard=options.guard, reduce=reduce)
    _reference.finalize(plan, buffers, table, stats_pass=options.stats_pass,
                        clip=options.max_grad_norm is not None, guard=options.guard,
                        grad_scale=gs, found_inf=fi)
    update = _reference.adam_update if plan.kind == L.KIND_ADAM else _reference.sgd_update
    # only the guard and a GradScaler's found_inf can skip a step
    update(plan, grads, rows, stats=options.stats, can_skip=options.guard or fi is not None)
    if plan.dist is not None and options.stats:  # whole-tensor norms
        plan.dist.reduce_rows(plan.ustat)


def l2_coefficient(kind: int, row) -> float:
    """The coefficient of ``p`` that a group's row adds to the gradient: Adam's L2 penalty
    (weight_decay, unless decoupled: AdamW adds nothing) or SGD's weight_decay."""
    if kind == L.KIND_ADAM and row[L.G_ADAM_DECOUPLED] != 0:
        return 0.0
    return row[L.G_WEIGHT_DECAY]


def _check_l2(plan, rows: tuple) -> None:
    """Each tensor's ``Entry.l2`` must say what its group's row says (the Triton update is
    compiled with or without the weight term per bucket: a wrong flag would drop the term, or
    compute ``0 * p``, a NaN for an inf parameter, where torch adds nothing). The optimizers
    rebuild the tables when a group's weight_decay moves between 0 and non-0
    (``_group_struct``); here, once per new ``rows`` object, every backend checks it, so that
    all of them refuse the same tables. ValueError before anything is modified."""
    want = [l2_coefficient(plan.kind, r) != 0 for r in rows]
    for f, gi in zip(plan.l2, plan.group_index):
        if f != want[gi]:
            want = want[gi]
            raise ValueError(
                f"param_groups[{gi}]: weight_decay {rows[gi][L.G_WEIGHT_DECAY]!r} "
                f"{'is' if want else 'is not'} added to the gradient, but its tensors' tables "
                f"were built with Entry.l2={not want}: build them with l2={want}")
    plan.l2_rows = rows


def _variant(b) -> dict:
    """The variant keywords of a bucket's launch (none for the fp32-floor ones with the weight
    term)."""
    out = {} if b.state is None and not b.mode else {"state": b.state, "mode": b.mode}
    if not b.l2:
        out["l2"] = False
    return out


def _run_triton(plan, buffers, groups, cfg, table, options: StepOptions, gs, fi) -> None:
    from ..kernels import replay
    from ..kernels.optim import (
        launch_finalize,
        launch_grad_stats,
        launch_reduce,
        launch_units_update,
        launch_update,
    )

    # the step's launches again through their compiled kernels when nothing they were
    # specialised on changed (kernels/replay.py: ~3 us a launch instead of 14-25 through the
    # JIT); distributed steps interleave collectives and go through the JIT every step
    rec = None
    if replay.ENABLED and plan.dist is None:
        # (options: by value; the rest by identity)
        key = (options, buffers, buffers.lr, table, gs is None, fi is None)
        dynamic = (groups, cfg, gs, fi)
        r = plan.replay
        if r is not None and r.matches(key) and r.replay(dynamic):
            return
        rec = ([], dynamic)
    if options.stats_pass:
        for b in plan.stat_buckets:
            launch_grad_stats(plan.tensors, b.blocks, plan.partials[b.block_offset:],
                              b.n_blocks, b.dtype, plan.block, options.guard, rec=rec)
        launch_reduce(plan.first_block, plan.partials, plan.tstat, len(plan), rec=rec)
        if plan.dist is not None:  # distributed: global per-tensor sums (one all-reduce)
            plan.dist.reduce_rows(plan.tstat)
    # the clock: every finalize program reads it, so the first update launch advances it (its
    # programs never read it); a step without update programs (only empty tensors) advances it
    # in a one-program finalize
    first = next((i for i, b in enumerate(plan.buckets) if b.n_blocks), None)
    launch_finalize(
        plan.tensors, groups, plan.scal, table, buffers.clock, len(plan), plan.kind, cfg=cfg,
        tstat=plan.tstat, ustat=plan.ustat, gstat=buffers.gstat, lr_out=buffers.lr,
        hist=buffers.history, hist_pos=buffers.history_pos, hist_len=buffers.history_len,
        grad_scale=gs, found_inf=fi, stats=options.stats_pass,
        clip=options.max_grad_norm is not None, guard=options.guard,
        history=buffers.history_len > 0, advance=first is None, rec=rec)
    for i, b in enumerate(plan.buckets):
        if b.units:
            launch_units_update(plan.kind, plan.tensors, b.blocks, plan.scal, plan.ustat,
                                b.n_blocks, b.dtype, b.units, b.chunk, b.flag, options.stats,
                                buffers.clock, i == first, **_variant(b), rec=rec)
        else:
            b.pipelined = launch_update(
                plan.kind, plan.tensors, b.blocks, plan.scal, plan.ustat, b.n_blocks, b.dtype,
                plan.block, b.flag, options.stats, buffers.clock, i == first, **_variant(b),
                # (a block_size of the user's own keeps one program per block of that size)
                runs=b.runs if plan.block == DEFAULT_BLOCK else None, n_runs=b.n_runs,
                run_elements=RUN_ELEMENTS, all3=b.all3, rec=rec)
    if plan.dist is not None and options.stats:  # whole-tensor norms (stats=True)
        plan.dist.reduce_rows(plan.ustat)
    if rec is not None and None not in rec[0]:
        plan.replay = replay.Recording(key, rec[0], rec[1], replay.current_device())

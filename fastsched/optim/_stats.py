"""One statistics view: decodes the buffers of a step, whichever backend filled them.

The Triton kernels and the PyTorch reference write the same buffers (``gstat``, ``lr``,
``history`` of :class:`~._buffers.StepBuffers`; ``tstat`` and ``ustat`` of a
:class:`~._tables.Plan`) with the layout of ``fastsched.kernels.layout``; this module is the
only reader.
"""

from __future__ import annotations

from typing import Any

import torch

from ..kernels import layout as L

_STATE_NAMES = {L.STATE_F32: "float32", L.STATE_BF16: "bfloat16", L.STATE_F16: "float16",
                L.STATE_F64: "float64", L.STATE_8BIT: "8bit"}

__all__ = ["stats_tensors", "stats_to_host", "history_to_host", "StatsMixin"]


def stats_tensors(plan, buffers, *, tensor_stats: bool) -> dict[str, torch.Tensor]:
    """Device tensors of the last step's statistics (no synchronisation).

    ``tensor_param_norm`` and ``tensor_update_rms`` come from the update pass, only with
    ``tensor_stats`` (``stats=True``): squares of the float32 values summed in float32 per block
    (Triton: float atomics), in float32 partial sums of 16 squares per lane added in float64
    (the compiled CPU backend: ~1e-6 relative, the accuracy of torch's float32 norms), or in
    float64 (the reference backend and float64 parameters).
    """
    g = buffers.gstat
    out = {"grad_norm": g[L.STAT_GRAD_NORM], "grad_norm_l1": g[L.STAT_GRAD_NORM_L1],
           "clip_coef": g[L.STAT_CLIP_COEF], "skipped": g[L.STAT_SKIPPED],
           "skip_count": g[L.STAT_SKIP_COUNT], "nonfinite": g[L.STAT_NONFINITE],
           "lr": buffers.lr, "tensor_grad_norm": plan.tstat[:, L.TS_NORM]}
    if tensor_stats:
        us = plan.ustat.to(torch.float64)
        out["tensor_param_norm"] = us[:, L.US_PARAM_SQ].sqrt()
        out["tensor_update_rms"] = (us[:, L.US_UPDATE_SQ] / plan.numel_dev).sqrt()
    if buffers.history_len:
        out["history"] = buffers.history
        out["history_pos"] = buffers.history_pos
    return out


def history_to_host(hist: torch.Tensor, pos: int, n: int) -> dict[str, list]:
    """The ring buffer (oldest first) as lists: step, grad_norm, grad_norm_l1, lr, skipped."""
    k = min(pos, n)
    rows = hist.cpu()[[(pos - k + i) % n for i in range(k)]]
    return {"step": rows[:, L.H_STEP].long().tolist(),
            "grad_norm": rows[:, L.H_GRAD_NORM].tolist(),
            "grad_norm_l1": rows[:, L.H_GRAD_NORM_L1].tolist(),
            "lr": rows[:, L.H_LR].tolist(),
            "skipped": (rows[:, L.H_SKIPPED] > 0).tolist()}


def stats_to_host(st: dict[str, torch.Tensor], names: list[str],
                  history_len: int) -> dict[str, Any]:
    """:func:`stats_tensors` as Python numbers, per-tensor entries keyed by ``names``."""
    host = {k: v.detach().cpu() for k, v in st.items()}
    out: dict[str, Any] = {k: float(host[k]) for k in
                           ("grad_norm", "grad_norm_l1", "clip_coef", "nonfinite")}
    out["skipped"] = skipped = bool(host["skipped"] > 0)
    out["skip_count"] = int(host["skip_count"])
    out["lr"] = host["lr"].tolist()
    per = "tensor_param_norm" in host

    def upd(k, i):
        return None if skipped or not per else float(host[k][i])

    out["tensors"] = {n: {"grad_norm": float(host["tensor_grad_norm"][i]),
                          "param_norm": upd("tensor_param_norm", i),
                          "update_rms": upd("tensor_update_rms", i)}
                      for i, n in enumerate(names)}
    if history_len:
        out["history"] = history_to_host(host["history"], int(host["history_pos"]),
                                         history_len)
    return out


class StatsMixin:
    """The statistics accessors of :class:`~._base.FusedOptimizer`."""


    @property
    def stats(self) -> dict[str, torch.Tensor]:
        """Device tensors of the last step's statistics (read them when you choose to).

        ``grad_norm`` (global L2 of the unscaled gradients, before clipping), ``grad_norm_l1``,
        ``clip_coef``, ``skipped`` (1.0 if the last step was skipped), ``skip_count``,
        ``nonfinite`` (non-finite gradient elements), ``lr`` (per group, as applied) and
        ``tensor_grad_norm`` (per tensor with a gradient, in :meth:`stats_names` order) come
        from the statistics pass; ``tensor_param_norm`` and ``tensor_update_rms`` need
        ``stats=True``. Empty until a step ran with the statistics pass.
        """
        if not self._options.stats_pass:
            raise RuntimeError("statistics are off: construct the optimizer with stats=True, "
                               "max_grad_norm=..., history=N or nonfinite='skip'|'raise'")
        plan = self._tables.plan
        if plan is None or not self._ran_stats:
            return {}
        return stats_tensors(plan, self._buffers, tensor_stats=self._ran_tensor_stats)

    def stats_names(self) -> list[str]:
        """Names of the tensors in the per-tensor statistics (parameter names when the optimizer
        was given ``named_parameters()``, else ``"group{g}.param{i}"``)."""
        plan = self._tables.plan
        return [] if plan is None else self._names_of(plan.params)

    def _names_of(self, params) -> list[str]:
        names = {}
        for gi, group in enumerate(self.param_groups):
            pn = group.get("param_names")
            for i, p in enumerate(group["params"]):
                names[id(p)] = pn[i] if pn else f"group{gi}.param{i}"
        return [names[id(p)] for p in params]

    def stats_dict(self) -> dict[str, Any]:
        """The statistics as Python numbers (this synchronises with the device, once).

        With ``nonfinite="raise"``, raises ``FloatingPointError`` if a step since the last call
        was skipped for non-finite gradients (the step itself was skipped on the device).
        """
        st = self.stats
        if not st:
            return {}
        out = stats_to_host(st, self.stats_names(), self._buffers.history_len)
        if self.nonfinite == "raise":
            seen = getattr(self, "_raised_skips", 0)
            self._raised_skips = out["skip_count"]
            if out["skip_count"] > seen:
                raise FloatingPointError(
                    f"{out['skip_count'] - seen} step(s) had non-finite gradients and were "
                    f"skipped (last global grad norm {out['grad_norm']})")
        return out

    def grad_norm_history(self) -> dict[str, list]:
        """The ring buffer of the last ``history`` steps (oldest first): steps, global L2 and L1
        gradient norms, learning rates of group 0 and skip flags. Synchronises once."""
        if not self._options.history:
            raise RuntimeError("no ring buffer: construct the optimizer with history=N")
        b = self._step_buffers()
        return history_to_host(b.history, int(b.history_pos.item()), b.history_len)

    @property
    def distributed(self) -> bool:
        """Whether the current tables communicate across ranks (DTensor parameters under FSDP2
        or tensor parallelism; False under DDP and for plain tensors)."""
        plan = self._tables.plan
        return plan is not None and plan.dist is not None

    def launches(self) -> list[dict[str, Any]]:
        """The launches of the last step's tables, in order (empty before the first step):
        per launch the pass (``"stats"``, ``"reduce"``, ``"finalize"``, ``"update"`` or
        ``"units"`` for ALLoRA), the storage dtype, the programs, the tensors it covers (names
        as in :meth:`stats_names`) and its variant (alignment hints, ALLoRA tile; below fp32
        ``"states"``, the storage of the states, and ``"mode"``: ``"master"`` or
        ``"stochastic_rounding"``; ``"pipelined": True`` when one program ran each run of
        ``RUN_ELEMENTS`` elements through the pipelined update; ``"l2": True`` when its
        tensors' groups add ``weight_decay * p`` to the gradient, Adam's L2 penalty or SGD's
        weight decay: a variant of its own, so such groups and those without the term launch
        apart).
        The reference backend runs the same passes as PyTorch operations."""
        plan = self._tables.plan
        if plan is None:
            return []
        names = self.stats_names()
        out = []
        if self._ran_stats and plan.backend == "triton":
            out += [{"pass": "stats", "dtype": b.dtype, "programs": b.n_blocks,
                     "tensors": names[b.lo:b.hi], "aligned": b.aligned}
                    for b in plan.stat_buckets]
            out.append({"pass": "reduce", "dtype": None, "programs": len(plan),
                        "tensors": names})
        if plan.backend == "triton":
            from ..kernels.optim import FINALIZE_ROWS

            # one program per FINALIZE_ROWS tensors (one in all when no update launch advances
            # the clock: a step of empty tensors only)
            programs = (-(-len(plan) // FINALIZE_ROWS)
                        if any(b.n_blocks for b in plan.buckets) else 1)
        else:
            programs = 1
        out.append({"pass": "finalize", "dtype": None, "programs": programs,
                    "tensors": names})
        for b in plan.buckets:
            d = {"pass": "units" if b.units else "update", "dtype": b.dtype,
                 "programs": b.n_runs if b.pipelined else b.n_blocks,
                 "tensors": names[b.lo:b.hi], "aligned": b.aligned}
            if b.pipelined:
                d["pipelined"] = True
            if b.state is not None:
                d["states"] = _STATE_NAMES[b.state]
            if b.mode:
                d["mode"] = "master" if b.mode & L.MODE_MASTER else "stochastic_rounding"
            if b.l2:
                d["l2"] = True
            if b.units:
                d.update(units_per_program=b.units, chunk=b.chunk,
                         unit_length=[r[L.T_ULEN] for r in plan.host_rows[b.lo:b.hi]])
            out.append(d)
        return out


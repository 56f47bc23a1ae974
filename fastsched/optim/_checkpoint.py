"""State dicts of the fused optimizers: torch's format plus the schedule and its clock."""

from __future__ import annotations

import warnings
from typing import Any

import torch

from ..schedules import Constant, from_dict
from . import _distributed
from ._precision import LOWP_KEYS, dtype_name

__all__ = ["CheckpointMixin"]


class CheckpointMixin:
    """``state_dict`` / ``load_state_dict`` of :class:`~._base.FusedOptimizer` (mixed in before
    ``torch.optim.Optimizer``, whose methods do the per-parameter part)."""

    def state_dict(self) -> dict[str, Any]:
        """torch's optimizer state dict plus a ``"fastsched"`` entry (schedule and clock).

        Per-parameter states use torch's names and layout, so ``torch.optim`` loads it (and
        ignores the extra entry). Reading the clock synchronises, once per checkpoint.

        Learning rates are stored as a torch optimizer under an LR scheduler stores them: with
        a schedule (anything but the default ``Constant(1.0)``) each group's ``"initial_lr"``
        is its base lr and ``"lr"`` the lr of the next step (base x schedule(clock)), so
        ``torch.optim`` continues at the scheduled lr and a torch scheduler resumed with
        ``last_epoch`` finds its base. Without a schedule the groups are stored as they are.
        """
        sd = super().state_dict()
        clock = int(self.clock.item())
        if _scheduled(self.schedule):
            f = self.schedule(clock)
            for g in sd["param_groups"]:
                base = g["lr"]
                applied = self._check_lr(base) * f
                if isinstance(base, torch.Tensor):
                    g["initial_lr"] = base.clone()
                    g["lr"] = torch.tensor(applied, dtype=base.dtype)
                else:
                    g["initial_lr"], g["lr"] = base, applied
        # groups without ALLoRA leave its keys out (load_state_dict restores them): a
        # torch.distributed.checkpoint load asks the checkpoint for every key of this dict and a
        # torch.optim checkpoint has none of them
        sd["param_groups"] = [{k: v for k, v in g.items()
                               if g.get("allora_eta") is not None
                               or k not in ("allora_eta", "allora_unit", "allora_apply")}
                              for g in sd["param_groups"]]
        # the options below fp32 likewise, at their defaults; state_dtype by name
        for g in sd["param_groups"]:
            for k, default in LOWP_KEYS.items():
                if k in g and (g[k] is default or g[k] == default):
                    del g[k]
            if "state_dtype" in g:
                g["state_dtype"] = dtype_name(g["state_dtype"])
        sd["fastsched"] = {"schedule": self.schedule.to_dict(), "clock": clock,
                           "seed": self._seed}
        # float64 parameters step in float64 since this key exists (in float32 before)
        sd["fastsched"]["float64_arithmetic"] = "float64"
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of this class or of the matching ``torch.optim`` optimizer.

        A torch checkpoint carries no schedule clock: it is set to the largest per-parameter
        ``step`` (the number of steps taken), and the schedule given at construction is kept.

        With a schedule in effect after the load (the checkpoint's, else this optimizer's; not
        the default ``Constant(1.0)``), a group's ``"initial_lr"`` (the base lr a torch LR
        scheduler or :meth:`state_dict` records) becomes its ``"lr"``: the schedule applies to
        the base, not to an already scheduled lr. Without ``"initial_lr"`` (a checkpoint of an
        earlier fastsched, or of torch without a scheduler) ``"lr"`` is the base, as before;
        without a schedule ``"lr"`` is kept as stored (an outside scheduler drives it).
        """
        sd = dict(state_dict)
        extra = sd.pop("fastsched", None)
        # a fastsched checkpoint from before float64 arithmetic, with float64 states
        f32_math = extra is not None and "float64_arithmetic" not in extra and any(
            isinstance(v, torch.Tensor) and v.dtype == torch.float64
            for st in sd.get("state", {}).values() if isinstance(st, dict)
            for k, v in st.items() if k != "step")
        schedule = from_dict(extra["schedule"]) if extra is not None else self.schedule
        # names and shapes checked before anything is modified (ValueError naming the parameter)
        _distributed.check_state_dict(self.param_groups, sd)
        sd["state"] = dict(sd.get("state", {}))
        # torch's load casts every floating state to the parameter's dtype: the master copy,
        # 8-bit codes and scales and states in another storage are set aside and put back
        taken = self._stash_lowp(sd)
        super().load_state_dict(sd)
        self._restore_lowp(sd, taken)
        for group in self.param_groups:
            # keys that a checkpoint of an older torch lacks (maximize, foreach, fused,
            # decoupled_weight_decay, ...) take this optimizer's defaults, as torch's
            # __setstate__ fills them (AdamW: decoupled_weight_decay=True); step() needs them
            if group.get("allora_eta") is not None and "allora_apply" not in group:
                # an ALLoRA group saved before allora_apply existed: ALLoRA scaled the gradient
                # then, and it resumes so (a torch checkpoint has no ALLoRA keys at all: it
                # takes this optimizer's defaults below)
                warnings.warn("fastsched: this checkpoint's ALLoRA group was saved before "
                              "allora_apply existed; it resumes with allora_apply='grad', the "
                              "behaviour it was saved with (the default is now 'update'). Set "
                              "the group's 'allora_apply' to change it.", UserWarning,
                              stacklevel=2)
                group["allora_apply"] = "grad"
            for k, v in self.defaults.items():
                group.setdefault(k, v)
            if isinstance(group.get("state_dtype"), str) and group["state_dtype"] != "8bit":
                group["state_dtype"] = getattr(torch, group["state_dtype"])
            group.setdefault("allora_eta", None)
            group.setdefault("allora_unit", "row")
            if "initial_lr" in group and _scheduled(schedule):
                group["lr"] = group["initial_lr"]
            self._validate_lowp(group)
            for p in group["params"]:
                st = self.state.get(p)
                if st:
                    self._upgrade_state(p, group, st)
                    # into this group's storage now: a torch checkpoint's states are quantised
                    # on load (state_dtype="8bit"), codes dequantised where no longer 8-bit
                    self._convert_states(p, group, st)
        if f32_math:
            warnings.warn("fastsched: this checkpoint was saved by a version that stepped "
                          "float64 parameters in float32 arithmetic; they now step in float64, "
                          "as torch.optim does (results move by ~1e-7 relative).", UserWarning,
                          stacklevel=2)
        if extra is not None:
            self.schedule = schedule
            self._seed = int(extra.get("seed", self._seed))
            clock = int(extra["clock"])
        else:
            steps = [float(s["step"]) for s in self.state.values() if "step" in s]
            clock = int(max(steps)) if steps else 0
        self.clock.fill_(clock)
        self._tables.invalidate()
        self._struct = None
        self._rows = None  # the loaded lr is no change between steps

    def _upgrade_state(self, p, group, st) -> None:
        if "step" in st:
            st["step"] = torch.as_tensor(st["step"], dtype=torch.float32).to(p.device)
        for name in self._state_names:
            v = st.get(name)
            if isinstance(v, torch.Tensor) and not v.is_floating_point():
                raise ValueError(f"checkpoint state {name!r} has dtype {v.dtype}")


def _scheduled(schedule) -> bool:
    """Whether the schedule multiplies the base lr (anything but the default constant 1)."""
    return schedule != Constant(1.0)

"""State dicts of the fused optimizers: torch's format plus the schedule and its clock."""

from __future__ import annotations

from typing import Any

import torch

from ..schedules import from_dict
from . import _distributed

__all__ = ["CheckpointMixin"]


class CheckpointMixin:
    """``state_dict`` / ``load_state_dict`` of :class:`~._base.FusedOptimizer` (mixed in before
    ``torch.optim.Optimizer``, whose methods do the per-parameter part)."""

    def state_dict(self) -> dict[str, Any]:
        """torch's optimizer state dict plus a ``"fastsched"`` entry (schedule and clock).

        Per-parameter states use torch's names and layout, so ``torch.optim`` loads it (and
        ignores the extra entry). Reading the clock synchronises, once per checkpoint.
        """
        sd = super().state_dict()
        # groups without ALLoRA leave its keys out (load_state_dict restores them): a
        # torch.distributed.checkpoint load asks the checkpoint for every key of this dict and a
        # torch.optim checkpoint has none of them
        sd["param_groups"] = [{k: v for k, v in g.items()
                               if g.get("allora_eta") is not None
                               or k not in ("allora_eta", "allora_unit")}
                              for g in sd["param_groups"]]
        sd["fastsched"] = {"schedule": self.schedule.to_dict(),
                           "clock": int(self.clock.item())}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of this class or of the matching ``torch.optim`` optimizer.

        A torch checkpoint carries no schedule clock: it is set to the largest per-parameter
        ``step`` (the number of steps taken), and the schedule given at construction is kept.
        """
        sd = dict(state_dict)
        extra = sd.pop("fastsched", None)
        # names and shapes checked before anything is modified (ValueError naming the parameter)
        _distributed.check_state_dict(self.param_groups, sd)
        super().load_state_dict(sd)
        for group in self.param_groups:
            # keys that a checkpoint of an older torch lacks (maximize, foreach, fused,
            # decoupled_weight_decay, ...) take this optimizer's defaults, as torch's
            # __setstate__ fills them (AdamW: decoupled_weight_decay=True); step() needs them
            for k, v in self.defaults.items():
                group.setdefault(k, v)
            group.setdefault("allora_eta", None)
            group.setdefault("allora_unit", "row")
            for p in group["params"]:
                st = self.state.get(p)
                if st:
                    self._upgrade_state(p, group, st)
        if extra is not None:
            self.schedule = from_dict(extra["schedule"])
            clock = int(extra["clock"])
        else:
            steps = [float(s["step"]) for s in self.state.values() if "step" in s]
            clock = int(max(steps)) if steps else 0
        self.clock.fill_(clock)
        self._tables.invalidate()
        self._struct = None

    def _upgrade_state(self, p, group, st) -> None:
        if "step" in st:
            st["step"] = torch.as_tensor(st["step"], dtype=torch.float32).to(p.device)
        for name in self._state_names:
            v = st.get(name)
            if isinstance(v, torch.Tensor):
                st[name] = v.to(device=p.device, dtype=p.dtype)
                if st[name].stride() != p.stride():
                    st[name] = torch.empty_like(p).copy_(st[name])

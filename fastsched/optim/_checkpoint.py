"""State dicts of the fused optimizers: torch's format plus the schedule and its clock."""

from __future__ import annotations

import warnings
from typing import Any

import torch

from ..schedules import Constant, from_dict
from . import _distributed
from ._precision import LOWP_KEYS, dtype_name, state_dtype_from_name

__all__ = ["CheckpointMixin"]

#: ALLoRA's group keys and the library's defaults (as ``GroupsMixin._check_new_group`` sets them)
ALLORA_KEYS = {"allora_eta": None, "allora_unit": "row", "allora_apply": "update"}
#: the group keys a state dict leaves out at this optimizer's defaults, with the library's
#: defaults (what a checkpoint of an earlier version that lacks one of them had)
OMITTED_KEYS = {**LOWP_KEYS, **ALLORA_KEYS}


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
        # the options below fp32 and ALLoRA's are left out of a group where they equal this
        # optimizer's defaults (the constructor's): a torch.distributed.checkpoint load asks the
        # checkpoint for every key of this dict and a torch.optim checkpoint has none of them.
        # Not where they equal the library's defaults (as before "group_defaults"): load
        # filled those from the loading constructor, so a group set apart from it
        # (state_dtype=None under "8bit") came back with the constructor's value. A group with
        # ALLoRA keeps its three keys (one that lacks allora_apply was saved before it existed).
        defaults = {k: self.defaults.get(k, lib) for k, lib in OMITTED_KEYS.items()}
        for g in sd["param_groups"]:
            allora = g.get("allora_eta") is not None
            for k, default in defaults.items():
                if k in g and not (allora and k in ALLORA_KEYS) and _same(g[k], default):
                    del g[k]
            if "state_dtype" in g:
                g["state_dtype"] = dtype_name(g["state_dtype"])
        sd["fastsched"] = {"schedule": self.schedule.to_dict(), "clock": clock,
                           "seed": self._seed}
        # float64 parameters step in float64 since this key exists (in float32 before)
        sd["fastsched"]["float64_arithmetic"] = "float64"
        # what a group that lacks one of those keys had: this optimizer's defaults where they
        # are not the library's (none for the library's defaults, as in the checkpoints of
        # earlier versions, which left the keys out at the library's defaults)
        own = {k: dtype_name(v) if k == "state_dtype" else v for k, v in defaults.items()
               if not _same(v, OMITTED_KEYS[k])}
        if own:
            sd["fastsched"]["group_defaults"] = own
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
        # and everything else torch's load would otherwise take in unchecked (it replaces the
        # groups and the states at once; a ValueError after it would leave the optimizer half
        # loaded): the groups' options as they will be, the seed, the 8-bit entries
        sd["param_groups"], old_allora = self._loaded_groups(sd["param_groups"], extra)
        seed = self._seed
        if extra is not None and "seed" in extra:
            seed = extra["seed"]
            if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
                raise ValueError(f"loaded state dict: seed must be an integer in [0, 2**64), "
                                 f"got {seed!r}")
        self._check_lowp_states(sd)
        if old_allora:
            # an ALLoRA group saved before allora_apply existed: ALLoRA scaled the gradient
            # then, and it resumes so (a torch checkpoint has no ALLoRA keys at all: it keeps
            # this optimizer's groups' values, _loaded_groups)
            warnings.warn("fastsched: this checkpoint's ALLoRA group was saved before "
                          "allora_apply existed; it resumes with allora_apply='grad', the "
                          "behaviour it was saved with (the default is now 'update'). Set "
                          "the group's 'allora_apply' to change it.", UserWarning,
                          stacklevel=2)
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
            # (the options below fp32 and ALLoRA's are set already: _loaded_groups)
            for k, v in self.defaults.items():
                group.setdefault(k, v)
            if "initial_lr" in group and _scheduled(schedule):
                group["lr"] = group["initial_lr"]
            self._validate_lowp(group)  # (valid: checked above; warns once what it cannot give)
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
            self._seed = seed
            clock = int(extra["clock"])
        else:
            steps = [float(s["step"]) for s in self.state.values() if "step" in s]
            clock = int(max(steps)) if steps else 0
        self.clock.fill_(clock)
        self._tables.invalidate()
        self._struct = None
        self._rows = None  # the loaded lr is no change between steps

    def _loaded_groups(self, groups: list, extra: dict | None) -> tuple[list, bool]:
        """The checkpoint's groups (copies) with every option below fp32 and of ALLoRA set,
        ``state_dtype`` as a dtype, validated against this optimizer's parameters before
        anything is loaded (ValueError naming the group and the option); and whether an ALLoRA
        group was saved before ``allora_apply`` existed (it resumes with ``"grad"``).

        A key that a group of the checkpoint lacks:

        * a fastsched checkpoint: the value the group had when it was saved, which is the
          saving optimizer's default: its ``"group_defaults"`` entry, else the library's default
          (a checkpoint of the library's defaults, or of an earlier version, which left the
          keys out where they equalled the library's defaults: each resumes as it was saved).
          The checkpoint's options win, as its lr and betas do (torch's rule), whatever this
          optimizer was built with; set ``param_groups[i][key]`` after the load to change one
          (the states are converted at the next step). Not this optimizer's value: which of
          the two won would depend on whether the saved value happened to equal the saving
          constructor's default, and a checkpoint of this version could not be told from one
          of an earlier version.
        * a torch.optim checkpoint, or one through torch.distributed.checkpoint (which passes
          no "fastsched" entry, and only the keys the loading optimizer's state dict has): the
          group keeps its own value (by index: the groups line up, as torch requires), so a
          torch checkpoint loads into the 8-bit states, master copies or ALLoRA the group was
          built with. Not the constructor's default: a group set apart from it would lose its
          own setting.
        """
        if extra is not None:
            own = extra.get("group_defaults", {})
            if not isinstance(own, dict):
                raise ValueError(f"loaded state dict: fastsched 'group_defaults' must be a dict "
                                 f"of group options, got {own!r}")
            saved_defaults = {k: own.get(k, lib) for k, lib in OMITTED_KEYS.items()}
        out, old_allora = [], False
        for gi, (saved, ours) in enumerate(zip(groups, self.param_groups)):
            g = dict(saved)
            if saved.get("allora_eta") is not None and "allora_apply" not in saved:
                g["allora_apply"] = "grad"
                old_allora = True
            for k, lib in OMITTED_KEYS.items():
                if k not in g:
                    g[k] = saved_defaults[k] if extra is not None \
                        else ours.get(k, self.defaults.get(k, lib))
            where = f"loaded state dict: param_groups[{gi}]"
            g["state_dtype"] = state_dtype_from_name(g["state_dtype"], where)
            # as the group will be: this optimizer's parameters (and names) under its options
            candidate = dict(g, params=ours["params"])
            if "param_names" in ours:
                candidate["param_names"] = ours["param_names"]
            try:
                self._validate_allora(candidate)
                self._validate_lowp(candidate, warn=False)
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
            out.append(g)
        return out, old_allora

    def _upgrade_state(self, p, group, st) -> None:
        if "step" in st:
            st["step"] = torch.as_tensor(st["step"], dtype=torch.float32).to(p.device)
        for name in self._state_names:
            v = st.get(name)
            if isinstance(v, torch.Tensor) and not v.is_floating_point():
                raise ValueError(f"checkpoint state {name!r} has dtype {v.dtype}")


def _same(value, default) -> bool:
    return value is default or value == default


def _scheduled(schedule) -> bool:
    """Whether the schedule multiplies the base lr (anything but the default constant 1)."""
    return schedule != Constant(1.0)

"""Parameter groups of the fused optimizers: what is accepted, validated and when.

Mixed into :class:`~._base.FusedOptimizer`: checks of new groups (dtypes, layout, devices,
distributed placements, ALLoRA options), the per-step rows of the groups table, validated again
whenever a value changed (before anything is modified), and the learning-rate contract (a
group's ``"lr"`` is the base the schedule multiplies).
"""

from __future__ import annotations

import abc
import math
from typing import Any

import torch

from ..kernels import layout as L
from ..schedules import Constant
from . import _distributed
from ._distributed import local
from ._precision import LOWP_KEYS
from .functional import ALLORA_APPLY

__all__ = ["GroupsMixin", "ALLORA_UNITS", "FLOAT_DTYPES", "TRITON_DTYPES"]

ALLORA_UNITS = ("row", "column", "tensor")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
#: float64 parameters: the CPU backends only (the Triton kernels have no float64 variant)
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense: an elementwise kernel may walk its storage as a flat array."""
    if t.is_contiguous():
        return True
    expected = 1
    for st, sz in sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz != 1):
        if st != expected:
            return False
        expected *= sz
    return True


class GroupsMixin:
    """Parameter groups, their validation and their rows of the groups table."""

    # -- parameter groups ---------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        n_before = len(self.param_groups)
        super().add_param_group(param_group)  # normalises params (and named params)
        try:
            self._check_new_group(self.param_groups[-1])
        except Exception:
            del self.param_groups[n_before:]
            raise
        self._tables.invalidate()

    def _check_new_group(self, group: dict[str, Any]) -> None:
        seen: set[int] = set()
        device = self._device
        for i, p in enumerate(group["params"]):
            self._check_param(f"params[{i}]", p, allora=False)
            if p.dtype not in TRITON_DTYPES and (self._backend_choice == "triton" or (
                    self._backend_choice == "auto" and local(p).device.type == "cuda")):
                raise ValueError(f"params[{i}]: dtype {p.dtype} is not supported by the Triton "
                                 "backend (float32, bfloat16, float16); float64 parameters need "
                                 "backend='cpu' or 'reference' on CPU tensors")
            if id(p) in seen:
                raise ValueError(f"some parameters appear more than once in a parameter group: "
                                 f"params[{i}] (shape {tuple(p.shape)})")
            seen.add(id(p))
            if device is None:
                device = p.device
            elif p.device != device:
                raise ValueError(f"fastsched optimizers need all parameters on one device, got "
                                 f"{device} and {p.device} (params[{i}])")
        group.setdefault("allora_eta", None)
        group.setdefault("allora_unit", "row")
        group.setdefault("allora_apply", "update")
        self._validate_group(group)
        self._validate_allora(group)
        self._validate_lowp(group)
        # distributed: DTensor placements (1-D mesh, Shard/Replicate, one mesh), else ValueError
        self._mesh = _distributed.check_params(group["params"], group.get("param_names"),
                                               len(self.param_groups) - 1, self._mesh)
        if group["allora_eta"] is not None:
            for i, p in enumerate(group["params"]):
                self._check_param(f"params[{i}]", p, allora=True)
        self._device = device

    @staticmethod
    def _check_param(where: str, p: torch.Tensor, allora: bool) -> None:
        """What the tables need of a parameter: a real floating dtype the executors store, dense
        (the kernels walk p, g and the states as flat arrays), contiguous under ALLoRA (its
        units are rows of the flat array). Checked when a group is added and again when the
        tables are rebuilt (``p.data`` may have been replaced since): a strided ``p.data``
        walked as flat would update elements outside the parameter."""
        if p.is_complex():
            raise ValueError(f"{where}: complex parameters are not supported by fastsched "
                             "optimizers (view them as real with torch.view_as_real)")
        if p.dtype not in FLOAT_DTYPES:
            names = ", ".join(str(d).removeprefix("torch.") for d in FLOAT_DTYPES)
            raise ValueError(f"{where}: dtype must be one of {names}, got {p.dtype}")
        if p.is_sparse:
            raise ValueError(f"{where}: sparse parameters are not supported")
        if not _dense(p):
            raise ValueError(f"{where}: parameters must be dense in memory (contiguous or a "
                             f"permutation of contiguous), got strides {p.stride()} for shape "
                             f"{tuple(p.shape)}")
        if allora and not p.is_contiguous():
            raise ValueError(f"{where}: ALLoRA units need contiguous parameters, got strides "
                             f"{p.stride()}")

    @staticmethod
    def _validate_allora(group: dict[str, Any]) -> None:
        eta, unit = group.get("allora_eta"), group.get("allora_unit", "row")
        if eta is not None and (isinstance(eta, bool) or not isinstance(eta, int | float)
                                or not math.isfinite(eta) or eta <= 0):
            raise ValueError(f"allora_eta must be a finite number > 0 or None, got {eta!r}")
        if unit not in ALLORA_UNITS:
            raise ValueError(f"allora_unit must be one of {list(ALLORA_UNITS)}, got {unit!r}")
        apply = group.get("allora_apply", "update")
        if apply not in ALLORA_APPLY:
            raise ValueError(f"allora_apply must be one of {list(ALLORA_APPLY)}, got {apply!r}")

    @abc.abstractmethod
    def _validate_group(self, group: dict[str, Any]) -> None:
        """Raise ValueError (worded like torch) for invalid hyperparameters of a group."""

    @abc.abstractmethod
    def _init_state(self, p: torch.Tensor, group: dict[str, Any], state: dict) -> None:
        """Create the parameter's state tensors that do not exist yet."""

    @abc.abstractmethod
    def _has_states(self, group: dict[str, Any]) -> tuple[bool, ...]:
        """Which of ``_state_names`` the group's parameters have (amsgrad, momentum)."""

    def _state_tensors(self, p: torch.Tensor, group: dict[str, Any]) -> tuple:
        """The parameter's state tensors in table order (T_S1, T_S2, T_S3); None: absent."""
        out = [self._state_tensor(p, group, n) if has else None
               for n, has in zip(self._state_names, self._has_states(group))]
        return tuple(out + [None] * (3 - len(out)))

    @abc.abstractmethod
    def _group_row(self, group: dict[str, Any]) -> tuple[float, ...]:
        """The group's row of the groups table (``functional.adam_row`` / ``sgd_row``)."""

    def _checked_groups(self) -> tuple[tuple, tuple]:
        """(rows of the groups table, table structure of each group), validated whenever a
        value changed: before anything is modified, and O(groups) when nothing did."""
        groups = self.param_groups
        # the raw eta too: the table holds 1/eta^2, so eta = -1 would pass for 1
        etas = tuple(g.get("allora_eta") for g in groups)
        try:
            rows = tuple(map(self._group_row, groups))
            struct = tuple(map(self._group_struct, groups))
        except Exception:  # a value the validation below explains
            rows = struct = None
        if rows is None or rows != self._rows or struct != self._struct or etas != self._etas:
            for g in groups:
                self._validate_group(g)
                self._validate_allora(g)
                self._validate_lowp(g)
            rows = tuple(map(self._group_row, groups))
            if not self.allow_lr_changes and self.schedule != Constant(1.0):
                # a group's lr that changed since the last step, or that differs from the
                # "initial_lr" a torch LR scheduler recorded when it was attached: an outside
                # scheduler and the schedule would multiply
                old = self._rows or ()
                for gi, (g, row) in enumerate(zip(groups, rows)):
                    lr = row[L.G_LR]
                    if gi < len(old) and old[gi][L.G_LR] != lr:
                        what = f"changed between steps ({old[gi][L.G_LR]!r} -> {lr!r})"
                    elif "initial_lr" in g and self._check_lr(g["initial_lr"]) != lr:
                        what = (f"is {lr!r} but its 'initial_lr' is "
                                f"{self._check_lr(g['initial_lr'])!r} (a torch LR scheduler's)")
                    else:
                        continue
                    raise RuntimeError(
                        f"{type(self).__name__}: param_groups[{gi}]['lr'] {what} while "
                        f"schedule={self.schedule!r} is set: an outside LR scheduler (or other "
                        "code) is changing the base lr, and the optimizer's schedule would "
                        "multiply it. Let one of them schedule: with HF Trainer pass "
                        "lr_scheduler_type=\"constant\" or optimizers=(opt, "
                        "fastsched.ScheduleAdapter(opt)); with Lightning return "
                        "fastsched.ScheduleAdapter(opt) as the lr_scheduler (or none); or drop "
                        "schedule= and keep the outside scheduler; or set "
                        "opt.allow_lr_changes = True to take each new lr as the base the "
                        "schedule multiplies.")
            struct = tuple(map(self._group_struct, groups))
            if struct != self._struct:
                self._tables.invalidate()
            self._rows, self._struct, self._etas = rows, struct, etas
        # the cached objects: run_step checks the tables against a new rows object only
        return self._rows, self._struct

    @staticmethod
    def _unit(group) -> str | None:
        return group.get("allora_unit") if group.get("allora_eta") is not None else None

    @abc.abstractmethod
    def _adds_l2(self, group: dict[str, Any]) -> bool:
        """Whether the group adds ``weight_decay * p`` to the gradient (Adam's L2 penalty, SGD's
        weight decay): the update kernels leave the term out otherwise (``Entry.l2``)."""

    def _group_struct(self, group) -> tuple:
        """What decides the tables' shape besides the tensors: state presence, ALLoRA units,
        the weight term in the gradient (a bucket variant: weight_decay moving between 0 and
        non-0 rebuilds the tables)."""
        return self._has_states(group) + (self._unit(group), self._adds_l2(group)) + tuple(
            str(group.get(k, v)) for k, v in LOWP_KEYS.items()) + (self._seed,)

    @staticmethod
    def _check_lr(lr) -> float:
        if isinstance(lr, torch.Tensor):
            if lr.device.type != "cpu" or lr.numel() != 1:
                raise ValueError("lr as a Tensor must be a 1-element CPU tensor (fastsched keeps "
                                 "the learning rate on the device itself: use a schedule)")
            lr = float(lr)
        if isinstance(lr, bool) or not isinstance(lr, int | float) or not math.isfinite(lr) \
                or lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        return float(lr)


"""Fused SGD with momentum."""

from __future__ import annotations

from typing import Any

import torch

from ..kernels.layout import KIND_SGD
from ..schedules import Schedule
from ._base import FusedOptimizer
from ._lowp import MIN_8BIT_SIZE
from ._tables import DEFAULT_BLOCK
from .functional import sgd_row

__all__ = ["SGD"]


class SGD(FusedOptimizer):
    r"""Stochastic gradient descent with momentum in one fused launch for every tensor.

    A drop-in replacement for ``torch.optim.SGD`` (same arguments, defaults and
    ``momentum_buffer`` state; Sutskever et al. 2013 for the Nesterov form). With
    :math:`\eta_t = \text{lr}\cdot s(\text{clock})`:

    .. math::
        d &= \pm g + \lambda\theta, \quad
        b \leftarrow \mu b + (1-\tau) d \;(\text{first step: } b = d), \\
        d &\leftarrow d + \mu b \text{ (nesterov) or } b, \quad \theta \leftarrow \theta - \eta_t d

    Each parameter also keeps a float32 ``step`` counter in its state (ignored by
    ``torch.optim.SGD`` when loading); when loading a torch SGD checkpoint it is set to 1 where
    a momentum buffer exists. Below fp32 (``master_weights``, ``stochastic_rounding``,
    ``state_dtype`` for the momentum buffer, ``min_8bit_size``, ``seed``): as
    :class:`fastsched.Adam`. ALLoRA (``allora_eta``, ``allora_unit``, ``allora_apply``): as
    :class:`fastsched.Adam`; without momentum and weight decay "update" and "grad" give the same
    step. See :class:`fastsched.Adam` for ``schedule``, ``backend`` and
    ``block_size``.
    """

    _kind = KIND_SGD
    _state_names = ("momentum_buffer",)

    def __init__(self, params, lr: float = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, *, maximize: bool = False,
                 foreach: bool | None = None, differentiable: bool = False,
                 fused: bool | None = None, schedule: Schedule | None = None,
                 backend: str = "auto", block_size: int = DEFAULT_BLOCK,
                 max_grad_norm: float | None = None, stats: bool = False,
                 nonfinite: str | None = None, history: int = 0,
                 allora_eta: float | None = None, allora_unit: str = "row",
                 allora_apply: str = "update", master_weights: bool = False,
                 stochastic_rounding: bool = False, state_dtype=None,
                 min_8bit_size: int = MIN_8BIT_SIZE, seed: int = 0):
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening,
                        weight_decay=weight_decay, nesterov=nesterov, maximize=maximize,
                        foreach=foreach, differentiable=differentiable, fused=fused)
        defaults.update(allora_eta=allora_eta, allora_unit=allora_unit, allora_apply=allora_apply,
                        master_weights=master_weights, stochastic_rounding=stochastic_rounding,
                        state_dtype=state_dtype, min_8bit_size=min_8bit_size)
        super().__init__(params, defaults, schedule=schedule, backend=backend,
                         block_size=block_size, max_grad_norm=max_grad_norm, stats=stats,
                         nonfinite=nonfinite, history=history, seed=seed)

    def _validate_group(self, group: dict[str, Any]) -> None:
        self._check_lr(group["lr"])
        mom, damp, wd = group["momentum"], group["dampening"], group["weight_decay"]
        if not isinstance(mom, int | float) or not mom >= 0.0:
            raise ValueError(f"Invalid momentum value: {mom}")
        if not isinstance(damp, int | float) or not 0.0 <= damp <= 1.0:
            raise ValueError(f"Invalid dampening value: {damp} (allowed: [0, 1])")
        if not isinstance(wd, int | float) or not wd >= 0.0:
            raise ValueError(f"Invalid weight_decay value: {wd}")
        if group["nesterov"] and (mom <= 0 or damp != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")

    def _init_state(self, p, group, state) -> None:
        if group["momentum"] != 0 and self._state_tensor(p, group, "momentum_buffer") is None:
            self._new_state(p, group, state, "momentum_buffer")
            # a buffer loaded from torch would carry history; a fresh one starts at step 0
            state["step"].zero_()

    def _has_states(self, group) -> tuple[bool, ...]:
        return (group["momentum"] != 0,)

    def _adds_l2(self, group) -> bool:
        return group["weight_decay"] != 0  # as torch.optim.SGD: d_p + weight_decay * p only then

    def _group_row(self, group) -> tuple[float, ...]:
        return sgd_row(self._check_lr(group["lr"]), group["momentum"], group["dampening"],
                       group["weight_decay"], group["nesterov"], group["maximize"],
                       group.get("allora_eta"), group.get("allora_apply", "update"))

    def _upgrade_state(self, p, group, st) -> None:
        if "step" not in st:
            st["step"] = torch.tensor(1.0 if st.get("momentum_buffer") is not None else 0.0)
        if st.get("momentum_buffer", 0) is None:
            del st["momentum_buffer"]
        super()._upgrade_state(p, group, st)

"""Fused Adam and AdamW."""

from __future__ import annotations

from typing import Any

import torch

from ..kernels.layout import KIND_ADAM
from ..schedules import Schedule
from ._base import FusedOptimizer
from ._lowp import MIN_8BIT_SIZE
from ._tables import DEFAULT_BLOCK
from .functional import adam_row

__all__ = ["Adam", "AdamW"]


class Adam(FusedOptimizer):
    r"""Adam (Kingma & Ba, arXiv 1412.6980) in one fused launch for every tensor.

    A drop-in replacement for ``torch.optim.Adam`` with the same arguments, defaults, parameter
    groups and state dict (``step``, ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``). For each
    parameter, with :math:`\eta_t = \text{lr} \cdot s(\text{clock})` where :math:`s` is the
    ``schedule`` (constant 1 by default):

    .. math::
        g &\leftarrow \pm g + \lambda\theta \quad(\text{L2; AdamW instead: }
            \theta \leftarrow \theta(1 - \eta_t\lambda)) \\
        m &\leftarrow \beta_1 m + (1-\beta_1) g, \quad v \leftarrow \beta_2 v + (1-\beta_2) g^2 \\
        \theta &\leftarrow \theta - \frac{\eta_t}{1-\beta_1^t}\,
            \frac{m}{\sqrt{\hat v}/\sqrt{1-\beta_2^t} + \epsilon},
            \quad \hat v = \max(v_{\max}, v) \text{ with amsgrad, else } v

    as torch's ``fused=True`` implementation computes it: fp32 arithmetic whatever the storage
    dtype, one rounding when storing; bias corrections and the scheduled learning rate in float64
    on the device. States are kept in the parameter's dtype, as torch does.

    Args:
        params: parameters or parameter groups (dicts), as for any torch optimizer.
        lr, betas, eps, weight_decay, amsgrad, maximize: as ``torch.optim.Adam``.
        schedule: a ``fastsched.schedules.Schedule`` multiplying every group's lr, evaluated on
            the device from the optimizer's clock (``opt.clock``).
        backend: ``"auto"`` (Triton for CUDA parameters, the compiled CPU executor for CPU
            parameters, the PyTorch reference where it is not built), ``"triton"`` (CPU tensors
            need ``TRITON_INTERPRET=1``), ``"cpu"`` or ``"reference"``.
        block_size: elements per program of the update launch (2048: 99% of copy bandwidth on
            an H100).
        max_grad_norm, stats, nonfinite, history: the step's options
            (:class:`fastsched.optim.StepOptions` says what each does and costs).
        allora_eta, allora_unit, allora_apply: ALLoRA (Huang & Balestriero 2024, arXiv
            2410.09692), per group: each unit (``"row"``, ``"column"`` of
            ``p.reshape(p.shape[0], -1)``, or ``"tensor"``) gets the multiplier
            ``1 / sqrt(||theta_unit||^2 + 1 / eta^2)``. ``allora_apply="update"`` (default)
            multiplies the unit's step after Adam's normalisation (the decoupled weight decay
            is not scaled): an adaptive per-unit learning rate, which is what the method
            describes; ``"grad"`` multiplies the gradient, which Adam's division by
            ``sqrt(v)`` normalises away (one AdamW step differs from plain AdamW by ~1e-7
            relative), so under Adam it is kept for SGD-type use and old checkpoints.
        master_weights, stochastic_rounding, state_dtype, min_8bit_size: below fp32, per group
            (:mod:`fastsched.optim._precision`): a float32 master of bf16 / fp16 parameters
            (``state["master_param"]``, as apex's FusedAdam); bf16 parameters written with
            stochastic rounding (Gupta et al. 2015, arXiv 1502.02551), unbiased and
            reproducible from ``seed``; states stored as ``torch.float32``,
            ``torch.bfloat16`` or ``"8bit"`` (block-wise quantisation, Dettmers et al. 2022,
            arXiv 2110.02861: one scale per 256 elements; tensors under ``min_8bit_size``
            elements, ALLoRA groups and DTensors whose rows hold no whole 256-element blocks
            keep float32 states). ``None``: the master's float32
            with ``master_weights``, else the parameter's dtype (torch).
        seed: the seed of stochastic rounding (an integer in [0, 2**64); in the state dict).
        foreach, fused, capturable: accepted for compatibility and ignored (the step is always
            fused and capturable). ``differentiable=True`` is rejected.

    ``step()`` performs no host synchronisation and can be captured in a CUDA graph. Gradients
    whose strides differ from the parameter's are copied once per step (one extra read and write
    of that gradient). ``step()`` costs one finalize launch plus one update launch per parameter
    dtype; tables are cached while parameters and gradient tensors stay the same.

    Distributed training: under FSDP2 (``fully_shard``) or 1-D tensor parallelism the
    parameters are DTensors; the step updates their local shards in place (one launch for all
    of them on CUDA) and makes global what needs it with one all-reduce per step of the (n, 4)
    float64 per-tensor gradient sums (32 n bytes for n tensors, on the device, no host sync):
    the clipping norm, the statistics and the non-finite guard (every rank skips together) cover
    all shards of all ranks; ``stats=True`` adds one all-reduce of the (n, 2) update sums so that
    per-tensor statistics are those of whole tensors. States are DTensors placed like their
    parameters, so ``torch.distributed.checkpoint`` saves and reshards them
    (``get_state_dict`` / ``set_state_dict``; torch.optim checkpoints load too; the schedule
    clock is recovered from the per-parameter steps, the schedule is the one given here).
    ALLoRA row units of FSDP2 (dim-0-sharded) parameters lie on one rank and cost nothing;
    units spanning ranks (columns or whole tensors of dim-0-sharded parameters) are summed by
    one all-reduce per tensor per step on the reference backend and refused (``ValueError``) by
    the Triton backend. Under DDP nothing is communicated. Refused at construction with a
    ``ValueError`` naming the parameter: meshes of more than one dimension, ``Partial``
    placements, parameters on different meshes, DTensors mixed with plain tensors.
    ``StateDictOptions(flatten_optimizer_state_dict=True)`` is not supported (torch's unflatten
    asks for the ALLoRA keys that the state dict leaves out when ALLoRA is off).

    Example::

        opt = fastsched.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1,
                              schedule=fastsched.schedules.Cosine(10_000, warmup_steps=500))
        loss.backward(); opt.step(); opt.zero_grad()
    """

    _kind = KIND_ADAM
    _state_names = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    _decoupled_default = False

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, amsgrad: bool = False, *,
                 maximize: bool = False, foreach: bool | None = None, capturable: bool = False,
                 differentiable: bool = False, fused: bool | None = None,
                 decoupled_weight_decay: bool | None = None,
                 schedule: Schedule | None = None, backend: str = "auto",
                 block_size: int = DEFAULT_BLOCK, max_grad_norm: float | None = None,
                 stats: bool = False, nonfinite: str | None = None, history: int = 0,
                 allora_eta: float | None = None, allora_unit: str = "row",
                 allora_apply: str = "update", master_weights: bool = False,
                 stochastic_rounding: bool = False, state_dtype=None,
                 min_8bit_size: int = MIN_8BIT_SIZE, seed: int = 0):
        if decoupled_weight_decay is None:
            decoupled_weight_decay = self._decoupled_default
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        maximize=maximize, foreach=foreach, capturable=capturable,
                        differentiable=differentiable, fused=fused,
                        decoupled_weight_decay=decoupled_weight_decay)
        defaults.update(allora_eta=allora_eta, allora_unit=allora_unit, allora_apply=allora_apply,
                        master_weights=master_weights, stochastic_rounding=stochastic_rounding,
                        state_dtype=state_dtype, min_8bit_size=min_8bit_size)
        super().__init__(params, defaults, schedule=schedule, backend=backend,
                         block_size=block_size, max_grad_norm=max_grad_norm, stats=stats,
                         nonfinite=nonfinite, history=history, seed=seed)

    def _validate_group(self, group: dict[str, Any]) -> None:
        self._check_lr(group["lr"])
        eps, betas, wd = group["eps"], group["betas"], group["weight_decay"]
        if not isinstance(eps, int | float) or not eps >= 0.0:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not isinstance(betas, tuple | list) or len(betas) != 2:
            raise ValueError(f"betas must be a pair of floats in [0, 1), got {betas!r}")
        for i, b in enumerate(betas):
            b = float(b) if isinstance(b, torch.Tensor) and b.device.type == "cpu" else b
            if not isinstance(b, int | float) or not 0.0 <= b < 1.0:
                raise ValueError(f"Invalid beta parameter at index {i}: {b}")
        if not isinstance(wd, int | float) or not wd >= 0.0:
            raise ValueError(f"Invalid weight_decay value: {wd}")

    def _init_state(self, p, group, state) -> None:
        for name in ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if group["amsgrad"] else ()):
            if self._state_tensor(p, group, name) is None:
                self._new_state(p, group, state, name)

    def _has_states(self, group) -> tuple[bool, ...]:
        return (True, True, bool(group["amsgrad"]))

    def _adds_l2(self, group) -> bool:
        # torch.optim.Adam adds weight_decay * p to the gradient only if weight_decay != 0;
        # AdamW (decoupled) never does
        return not group["decoupled_weight_decay"] and group["weight_decay"] != 0

    def _group_row(self, group) -> tuple[float, ...]:
        b1, b2 = group["betas"]
        return adam_row(self._check_lr(group["lr"]), b1, b2, group["eps"],
                        group["weight_decay"], group["amsgrad"], group["maximize"],
                        group["decoupled_weight_decay"], group.get("allora_eta"),
                        group.get("allora_apply", "update"))


class AdamW(Adam):
    r"""AdamW (Loshchilov & Hutter, arXiv 1711.05101): Adam with decoupled weight decay
    :math:`\theta \leftarrow \theta (1 - \eta_t \lambda)`, fused; a drop-in replacement for
    ``torch.optim.AdamW`` (default ``weight_decay=1e-2``). See :class:`Adam` for the arguments.
    """

    _decoupled_default = True

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False, *,
                 maximize: bool = False, foreach: bool | None = None, capturable: bool = False,
                 differentiable: bool = False, fused: bool | None = None,
                 schedule: Schedule | None = None, backend: str = "auto",
                 block_size: int = DEFAULT_BLOCK, max_grad_norm: float | None = None,
                 stats: bool = False, nonfinite: str | None = None, history: int = 0,
                 allora_eta: float | None = None, allora_unit: str = "row",
                 allora_apply: str = "update", master_weights: bool = False,
                 stochastic_rounding: bool = False, state_dtype=None,
                 min_8bit_size: int = MIN_8BIT_SIZE, seed: int = 0):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, maximize=maximize,
                         foreach=foreach, capturable=capturable, differentiable=differentiable,
                         fused=fused, decoupled_weight_decay=True, schedule=schedule,
                         backend=backend, block_size=block_size, max_grad_norm=max_grad_norm,
                         stats=stats, nonfinite=nonfinite, history=history,
                         allora_eta=allora_eta, allora_unit=allora_unit,
                         allora_apply=allora_apply, master_weights=master_weights,
                         stochastic_rounding=stochastic_rounding, state_dtype=state_dtype,
                         min_8bit_size=min_8bit_size, seed=seed)

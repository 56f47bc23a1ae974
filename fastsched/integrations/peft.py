"""ALLoRA parameter groups from a PEFT model.

ALLoRA (Huang & Balestriero 2024, arXiv 2410.09692) scales the learning rate of each unit of the
LoRA factors by ``1 / sqrt(||theta_unit||^2 + 1 / eta^2)`` in place of LoRA's dropout and
``alpha / r`` scaling. :func:`allora_param_groups` puts the LoRA factors of a PEFT model (``lora_A``
/ ``lora_B`` of linear and convolution layers, ``lora_embedding_A`` / ``lora_embedding_B`` of
embeddings, for every adapter) in one group with ``allora_eta`` and leaves every other trainable
parameter (``modules_to_save`` heads, biases PEFT trains) in a plain group. Frozen parameters are
left out, as an optimizer of a PEFT model should.

    from fastsched.integrations.peft import allora_param_groups
    opt = fastsched.AdamW(allora_param_groups(model, eta=4.0), lr=1e-3)
"""

from __future__ import annotations

import re
from typing import Any

import torch

__all__ = ["allora_param_groups", "is_lora_factor"]

# the parameter names PEFT gives LoRA factors: "...lora_A.<adapter>.weight",
# "...lora_B.<adapter>.weight", "...lora_embedding_A.<adapter>", "...lora_embedding_B.<adapter>"
_LORA = re.compile(r"(^|\.)(lora_A|lora_B)\.[^.]+\.weight$|(^|\.)lora_embedding_[AB]\.[^.]+$")


def is_lora_factor(name: str) -> bool:
    """Whether a parameter name (``model.named_parameters()``) is a PEFT LoRA factor."""
    return _LORA.search(name) is not None


def allora_param_groups(model: torch.nn.Module, *, eta: float, unit: str = "row",
                        **lora_group: Any) -> list[dict[str, Any]]:
    """Parameter groups for a fastsched optimizer: the LoRA factors with ALLoRA, the rest plain.

    Args:
        model: a PEFT model (or any module whose LoRA factors carry PEFT's parameter names).
        eta: ALLoRA's ``eta`` (``allora_eta`` of the group; the scale saturates at ``eta`` for
            units near zero, as LoRA's B factors start).
        unit: ``"row"`` (default; a row of ``lora_A`` is one rank component's input weights, a
            row of ``lora_B`` one output's weights over the ranks), ``"column"`` or
            ``"tensor"``.
        **lora_group: more options of the LoRA group (``lr``, ``weight_decay``, ...).

    Returns named groups (``(name, parameter)`` pairs, so statistics are named); a group is
    left out when it would be empty. Raises ``ValueError`` when the model has no trainable
    LoRA factor.
    """
    lora, other = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (lora if is_lora_factor(name) else other).append((name, p))
    if not lora:
        raise ValueError("model: no trainable LoRA factor (parameters named lora_A / lora_B / "
                         "lora_embedding_A / lora_embedding_B, as PEFT names them)")
    groups = [{"params": lora, "allora_eta": eta, "allora_unit": unit, **lora_group}]
    if other:
        groups.append({"params": other})
    return groups

"""Distributed parameters: FSDP2 / tensor-parallel DTensors, and checkpoint checks.

The fused step works on the local shards (``DTensor._local_tensor``): one launch for all local
shards on CUDA, the reference backend on CPU. What needs a global view is made global with one
all-reduce of small per-tensor vectors, issued on the device without a host synchronisation:

* gradient statistics: the (n, 4) float64 per-tensor sums (sum g^2, sum |g|, non-finite count)
  are summed over the parameters' process group before the clip coefficient and the skip flag
  are computed, so every rank clips by the global norm and skips together. Replicated tensors
  (``Replicate()`` placement) count once: their rows are zeroed on all but mesh rank 0 first.
  Cost: one all-reduce of 32 * n bytes per step (n = number of parameter tensors).
* per-tensor parameter norms and update RMS (``stats=True`` only): one more all-reduce of the
  (n, 2) vector after the update.
* ALLoRA units that span the sharded dimension (column or tensor units of a ``Shard(0)``
  parameter, the FSDP2 layout; row units of a ``Shard(d >= 1)`` parameter): the reference backend
  all-reduces the per-unit partial sums of squares (one all-reduce of ``units`` floats per such
  tensor per step); the Triton backend raises (see :func:`check_units`). Row units of FSDP2
  parameters lie on one rank and cost nothing extra.

Under DDP parameters are plain tensors whose gradients are already averaged: nothing is
communicated. Not supported, with an error naming the parameter raised at construction: meshes
of more than one dimension (FSDP2 + TP on a 2-D mesh, HSDP), ``Partial`` placements, DTensor
parameters on different meshes in one optimizer, and plain tensors mixed with DTensors.
Every rank must step the same parameters (the ones with a gradient), as FSDP2 guarantees.

Checkpoints: states are DTensors (``zeros_like(p)``), so torch.distributed.checkpoint saves and
reshards them. ``get_optimizer_state_dict`` keeps only ``state`` and ``param_groups``: the
``"fastsched"`` entry (schedule and clock) is dropped there and the clock is recovered from the
per-parameter steps on load. Groups without ALLoRA leave the ALLoRA keys out of the state dict,
since a DCP load asks the checkpoint for every key of the state dict it loads into (a
torch.optim checkpoint has none of them); ``flatten_optimizer_state_dict=True`` is therefore not
supported (torch's unflatten asks for every key of the live groups).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

try:  # torch builds without distributed support have no DTensor
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # pragma: no cover - depends on the torch build
    dist = None
    DTensor = Replicate = Shard = None

__all__ = ["local", "is_dtensor", "check_params", "DistPlan", "dist_plan", "check_units",
           "check_state_dict"]


def is_dtensor(t) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local(t):
    """The local shard of a DTensor (a view sharing its storage), else ``t`` itself."""
    return t._local_tensor if is_dtensor(t) else t


def _name(names, i, gi) -> str:
    return names[i] if names else f"group{gi}.param{i}"


def check_params(params, names, gi: int, mesh: Any) -> Any:
    """Validate the placements of a parameter group; return the optimizer's mesh.

    ``mesh`` is the mesh of the groups seen so far: None (none yet), False (plain tensors) or a
    DeviceMesh. Raises ``ValueError`` naming the first offending parameter.
    """
    for i, p in enumerate(params):
        if not is_dtensor(p):
            if mesh not in (None, False):
                raise ValueError(f"{_name(names, i, gi)}: a plain tensor in an optimizer over "
                                 f"DTensor parameters (mesh {mesh}); fastsched needs every "
                                 "parameter sharded the same way (fully_shard the whole model, "
                                 "or use one optimizer per kind of parameter)")
            mesh = False
            continue
        m = p.device_mesh
        if mesh is False:
            raise ValueError(f"{_name(names, i, gi)}: a DTensor parameter in an optimizer over "
                             "plain tensors; fastsched needs every parameter sharded the same "
                             "way")
        if m.ndim != 1:
            raise ValueError(f"{_name(names, i, gi)}: DTensor on a {m.ndim}-D mesh {m}; fastsched "
                             "supports 1-D meshes only (FSDP2 or tensor parallel, not both / "
                             "not HSDP)")
        # the same ranks in the same order (the reductions run on the first mesh's group)
        if mesh is not None and (m.device_type != mesh.device_type
                                 or m.mesh.tolist() != mesh.mesh.tolist()):
            raise ValueError(f"{_name(names, i, gi)}: DTensor on mesh {m} while other parameters "
                             f"are on {mesh}; one optimizer must have all parameters on one "
                             "mesh")
        pl = p.placements[0]
        if not isinstance(pl, Shard | Replicate):
            raise ValueError(f"{_name(names, i, gi)}: placement {pl} is not supported (Shard or "
                             "Replicate only; a Partial parameter has no well-defined norm)")
        mesh = m
    return mesh


def _units_span_shard(p, unit: str | None) -> bool:
    """Whether an ALLoRA unit of ``p`` spans ranks (needs an all-reduce of partial sums)."""
    if unit is None or not is_dtensor(p) or p.device_mesh.size() == 1:
        return False
    pl = p.placements[0]
    if not isinstance(pl, Shard):
        return False  # replicated: every rank holds the whole unit
    if p.dim() < 2 or unit == "tensor":
        return True
    # rows are the slices along dim 0 (whole on each rank unless another dim is sharded);
    # columns run along dim 0
    return pl.dim != 0 if unit == "row" else pl.dim == 0


def check_units(params, units, names_of) -> None:
    """Triton backend: ALLoRA units that span ranks are not supported (use the reference backend
    or row units with FSDP2). Raised at the first step, before anything is modified."""
    for p, u in zip(params, units):
        if _units_span_shard(p, u):
            raise ValueError(f"{names_of(p)}: ALLoRA {u!r} units of a parameter sharded on dim "
                             f"{p.placements[0].dim} span ranks; the Triton backend computes "
                             "unit norms on the local shard only. Use allora_unit='row' with "
                             "FSDP2 (Shard(0)) or backend='reference'")


@dataclass
class DistPlan:
    """Communication of one parameter set: the process group and the rows this rank counts."""

    group: Any
    owned: torch.Tensor  # (n,) bool: where this rank's partial sums count
    all_owned: bool
    unit_groups: list  # per tensor: the process group of its ALLoRA unit reduction, or None

    def reduce_rows(self, t: torch.Tensor) -> torch.Tensor:
        """Sum per-tensor rows over ranks, replicated tensors counted once (in place when
        possible; returns the result)."""
        if not self.all_owned:  # where, not a product: 0 * inf would be nan
            t.copy_(torch.where(self.owned.reshape(-1, *([1] * (t.dim() - 1))), t, 0))
        dist.all_reduce(t, group=self.group)
        return t

    def reduce_units(self, i: int, sums: torch.Tensor) -> torch.Tensor:
        g = self.unit_groups[i]
        if g is not None:
            dist.all_reduce(sums, group=g)
        return sums


def dist_plan(params, units, device) -> DistPlan | None:
    """The communication plan of the tensors of a step (None: plain tensors, nothing to do)."""
    if not params or not is_dtensor(params[0]):
        return None
    mesh = params[0].device_mesh
    rank0 = mesh.get_local_rank() == 0
    owned = [isinstance(p.placements[0], Shard) or rank0 for p in params]
    group = mesh.get_group()
    mask = torch.tensor(owned)
    # pinned and non-blocking: a pageable copy would synchronise the stream
    mask = (mask.pin_memory().to(device, non_blocking=True) if torch.device(device).type == "cuda"
            else mask.to(device))
    return DistPlan(group, mask, all(owned),
                    [group if _units_span_shard(p, u) else None for p, u in zip(params, units)])


def check_state_dict(param_groups, state_dict) -> None:
    """Before anything is loaded: the checkpoint's parameters match this optimizer's by name
    (where both recorded names) and every state tensor has its parameter's (global) shape.
    Raises ``ValueError`` naming the parameter."""
    groups = state_dict.get("param_groups")
    state = state_dict.get("state")
    if not isinstance(groups, list) or not isinstance(state, dict):
        raise ValueError("not an optimizer state dict: expected 'state' and 'param_groups'")
    if len(groups) != len(param_groups):
        raise ValueError(f"loaded state dict has a different number of parameter groups "
                         f"({len(groups)}, this optimizer {len(param_groups)})")
    for gi, (ours, theirs) in enumerate(zip(param_groups, groups)):
        names = ours.get("param_names")
        saved_names = theirs.get("param_names")
        ids = theirs.get("params", [])
        if len(ids) != len(ours["params"]):
            raise ValueError(f"loaded state dict contains a parameter group that doesn't match "
                             f"the size of optimizer's group (group {gi}: {len(ids)} parameters, "
                             f"this optimizer {len(ours['params'])})")
        for i, (p, pid) in enumerate(zip(ours["params"], ids)):
            name = _name(names, i, gi)
            if names and saved_names and saved_names[i] != names[i]:
                raise ValueError(f"{name}: the checkpoint has parameter {saved_names[i]!r} in "
                                 "its place")
            for k, v in (state.get(pid) or {}).items():
                if k == "step" or k.endswith("_scale") or not isinstance(v, torch.Tensor):
                    # (8-bit block scales, one per 256 elements: checked, and re-laid out or
                    # re-quantised if they were saved for other blocks, when converted)
                    continue
                if tuple(v.shape) != tuple(p.shape):
                    raise ValueError(f"{name}: checkpoint state {k!r} has shape "
                                     f"{tuple(v.shape)}, the parameter {tuple(p.shape)}")

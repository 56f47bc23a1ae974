"""Below the fp32 floor: master weights, stochastic rounding and the storage of the states.

Mixed into :class:`~._base.FusedOptimizer`. Group options (each a constructor argument, per
group like any hyperparameter):

* ``master_weights`` (bf16 / fp16 parameters): a float32 copy in ``state["master_param"]`` is
  what the step updates; the parameter is written as the master rounded to nearest.
* ``stochastic_rounding`` (bf16 parameters, no master): the parameter is written rounded up or
  down with probability proportional to the distance (:mod:`._lowp`), keyed by the
  optimizer's ``seed``, the tensor's step, its position in ``param_groups`` and the element's
  index in the whole parameter.
* ``state_dtype``: None (the dtype of the weights the step updates: the master's float32 with
  ``master_weights``, else the parameter's, as torch), ``torch.float32``, ``torch.bfloat16`` or
  ``"8bit"`` (block-scaled codes ``<name>_code`` uint8 and ``<name>_scale`` float32, one scale
  per 256 elements; parameters of fewer than ``min_8bit_size`` elements and ALLoRA groups keep
  float32 states).

Bytes per parameter of an AdamW step (read + written; p, g, states, master):
fp32: 4+4 p, 4 g, 16 m/v = 28 B, 8 B of state held; bf16 params + master + fp32 states: 2 p
(written only: the step reads the master), 2 g, 4+4 master, 16 m/v = 28 B, 12 B held; bf16 +
stochastic rounding + bf16 states: 2+2, 2, 8 = 14 B, 4 B held; bf16 + SR + 8-bit: 2+2, 2, 4
(+0.06 scales) = ~10 B, ~2.03 B held (``fastsched bench --lowp`` measures them).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch

from ..kernels import layout as L
from . import _cpu, _lowp
from ._distributed import _name as _param_name
from ._distributed import is_dtensor, local
from ._tables import LowP

__all__ = ["PrecisionMixin", "STATE_DTYPES", "LOWP_KEYS", "state_dtype_from_name"]

#: the values of ``state_dtype``
STATE_DTYPES = (None, torch.float32, torch.bfloat16, "8bit")
#: group keys of these options and their defaults (left out of a state dict at the default)
LOWP_KEYS = {"master_weights": False, "stochastic_rounding": False, "state_dtype": None,
             "min_8bit_size": _lowp.MIN_8BIT_SIZE}


def dtype_name(v) -> str | None:
    """``state_dtype`` as stored in a state dict (a string; torch dtypes do not travel well)."""
    return v if v is None or isinstance(v, str) else str(v).removeprefix("torch.")


#: ``state_dtype`` by the name :func:`dtype_name` stores
_BY_NAME = {"float32": torch.float32, "bfloat16": torch.bfloat16, "8bit": "8bit"}


def state_dtype_from_name(v, where: str):
    """``state_dtype`` of a loaded group (a name, None, or a torch dtype, which
    :meth:`PrecisionMixin._validate_lowp` checks); ValueError naming the allowed names."""
    if v is None or isinstance(v, torch.dtype):
        return v
    if isinstance(v, str) and v in _BY_NAME:
        return _BY_NAME[v]
    raise ValueError(f"{where}: state_dtype must be one of None, {', '.join(map(repr, _BY_NAME))}"
                     f" (as a state dict stores it), got {v!r}")


_flat = _lowp.storage_flat


def blocks_in_rows(p) -> bool:
    """Whether 8-bit states of ``p`` keep the same blocks on any sharding: always for a plain
    tensor; for a DTensor (FSDP2) when it is sharded on dim 0 only (or replicated), has at least
    two dims, its local shard is contiguous and a row (one index of dim 0) is a whole number of
    ``Q_BLOCK`` blocks. Then a shard's flat blocks are whole rows' blocks, its scales are whole
    rows of a ``(rows, row // Q_BLOCK)`` scale tensor sharded like the parameter, and
    torch.distributed.checkpoint moves codes and scales row by row to any world size."""
    if not is_dtensor(p):
        return True
    return _whole_rows(p) and all(pl.is_replicate() or pl.is_shard(dim=0)
                                  for pl in p.placements)


def _like(p, t: torch.Tensor, shape=None):
    """``t`` (a local tensor) as a DTensor sharded like ``p`` (of ``shape``, default ``p``'s);
    ``t`` itself when ``p`` is a plain tensor."""
    if not is_dtensor(p):
        return t
    from torch.distributed.tensor import DTensor

    shape = tuple(p.shape) if shape is None else tuple(shape)
    stride = tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))
    return DTensor.from_local(t, p.device_mesh, p.placements, run_check=False, shape=shape,
                              stride=stride)


def _whole_rows(p) -> bool:
    """Rows (one index of dim 0) of whole blocks, laid out row after row."""
    return p.dim() >= 2 and math.prod(p.shape[1:]) % L.Q_BLOCK == 0 \
        and local(p).is_contiguous()


def scale_shape(p, shard: bool = False) -> tuple:
    """Shape of an 8-bit state's scales, one per block of the flat tensor: ``(rows, row //
    Q_BLOCK)`` when the rows hold whole blocks (the matrices of a model; for a DTensor sharded
    like it, see :func:`blocks_in_rows`), so that a checkpoint moves between one process and
    FSDP2 shards; else flat. ``shard``: the local shard's."""
    if _whole_rows(p):
        rows = local(p).shape[0] if shard else p.shape[0]
        return (rows, math.prod(p.shape[1:]) // L.Q_BLOCK)
    return (_lowp.n_blocks(p.numel()),)


def _scale_fits(p, codes, scale) -> bool:
    """The scales are laid out for ``p``: the shape of :func:`scale_shape`, and for a DTensor
    codes and scales sharded like it."""
    if is_dtensor(p):
        return all(is_dtensor(t) and t.device_mesh == p.device_mesh
                   and t.placements == p.placements for t in (codes, scale)) \
            and tuple(scale.shape) == scale_shape(p)
    return not is_dtensor(scale) and not is_dtensor(codes) \
        and tuple(scale.shape) == scale_shape(p)


def _full_values(codes, scale, signed: bool, what: str) -> torch.Tensor:
    """The float32 values of 8-bit ``codes`` / ``scale`` of any layout or sharding (gathered:
    every rank calls this for the same state, as they all load the same checkpoint)."""
    c = codes.full_tensor() if is_dtensor(codes) else codes
    sc = (scale.full_tensor() if is_dtensor(scale) else scale).reshape(-1)
    if sc.numel() != _lowp.n_blocks(c.numel()):
        raise ValueError(f"{what}: {sc.numel()} scales for {c.numel()} 8-bit codes (one per "
                         f"{L.Q_BLOCK} elements expected)")
    out = torch.empty_like(c, dtype=torch.float32)  # (blocks in c's storage order)
    _flat(out).copy_(_lowp.dequantize(_flat(c), sc.to(c.device), signed))
    return out


def _local_like(p, v: torch.Tensor) -> torch.Tensor:
    """The local shard of ``v`` (a state of ``p``'s shape) in ``p``'s sharding."""
    if is_dtensor(v):
        if is_dtensor(p) and (v.device_mesh != p.device_mesh or v.placements != p.placements):
            v = v.redistribute(p.device_mesh, p.placements)
        return local(v)
    if is_dtensor(p) and tuple(v.shape) == tuple(p.shape) != tuple(local(p).shape):
        from torch.distributed.tensor import distribute_tensor

        return local(distribute_tensor(v.to(local(p).device), p.device_mesh, p.placements))
    return v


def quantize_like(p: torch.Tensor, v: torch.Tensor, signed: bool):
    """(codes laid out like ``p``, scales) of a full-precision state ``v`` of ``p``'s shape
    (DTensors: quantised shard by shard, codes and scales sharded like ``p``)."""
    lp = local(p)
    full = torch.empty_like(lp, dtype=torch.float32).copy_(_local_like(p, v))
    codes, scale = _lowp.quantize(_flat(full), signed)
    out = torch.empty_like(lp, dtype=torch.uint8)
    _flat(out).copy_(codes)
    return _like(p, out), _like(p, scale.reshape(scale_shape(p, shard=True)), scale_shape(p))


def dequantize_like(p: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, signed: bool):
    """The float32 state (laid out like ``p``, a DTensor like it) of ``codes`` and ``scale``."""
    lp = local(p)
    out = torch.empty_like(lp, dtype=torch.float32)
    if not _scale_fits(p, codes, scale):  # saved for other blocks or another sharding
        out.copy_(_local_like(p, _full_values(codes, scale, signed, "8-bit state")))
        return _like(p, out)
    lc, ls = local(codes), local(scale).reshape(-1)
    _flat(out).copy_(_lowp.dequantize(_flat(lc), ls.to(lc.device), signed))
    return _like(p, out)


class PrecisionMixin:
    """Options below fp32: validation, state storage, conversions on load and export."""

    def _validate_lowp(self, group: dict[str, Any], warn: bool = True) -> None:
        """ValueError for a bad option or combination; ``warn``: also warn (once) about 8-bit
        storage the group asks for and cannot have (off for a checkpoint's group checked before
        it is loaded: the load may still be refused)."""
        mw, sr = group.get("master_weights", False), group.get("stochastic_rounding", False)
        sd, m8 = group.get("state_dtype"), group.get("min_8bit_size", _lowp.MIN_8BIT_SIZE)
        if not isinstance(mw, bool):
            raise ValueError(f"master_weights must be a bool, got {mw!r}")
        if not isinstance(sr, bool):
            raise ValueError(f"stochastic_rounding must be a bool, got {sr!r}")
        if not any(sd is d or sd == d for d in STATE_DTYPES if not isinstance(d, str)) \
                and sd != "8bit":
            raise ValueError(f"state_dtype must be one of None, torch.float32, torch.bfloat16, "
                             f"'8bit', got {sd!r}")
        if isinstance(m8, bool) or not isinstance(m8, int) or m8 < 0:
            raise ValueError(f"min_8bit_size must be an integer >= 0, got {m8!r}")
        if mw and sr:
            raise ValueError("master_weights=True and stochastic_rounding=True: choose one (the "
                             "master copy keeps the exact value; stochastic rounding is for "
                             "bf16 parameters without one)")
        if sd == "8bit" and group.get("amsgrad"):
            raise ValueError("state_dtype='8bit' and amsgrad=True: max_exp_avg_sq has no 8-bit "
                             "storage; use state_dtype=torch.bfloat16 or amsgrad=False")
        names = group.get("param_names")
        rowless = []
        for i, p in enumerate(group["params"]):
            if sd == "8bit" and not blocks_in_rows(p) and p.numel() >= m8 \
                    and group.get("allora_eta") is None:
                rowless.append(names[i] if names else f"params[{i}]")
            if mw and p.dtype not in (torch.bfloat16, torch.float16):
                raise ValueError(f"params[{i}]: master_weights=True needs bfloat16 or float16 "
                                 f"parameters, got {p.dtype} (a float32 parameter is its own "
                                 "master)")
            if sr and p.dtype != torch.bfloat16:
                raise ValueError(f"params[{i}]: stochastic_rounding=True needs bfloat16 "
                                 f"parameters, got {p.dtype}")
            if sr and is_dtensor(p) and any(getattr(pl, "dim", 0) != 0 for pl in p.placements
                                            if hasattr(pl, "dim")):
                raise ValueError(f"params[{i}]: stochastic_rounding=True with a parameter "
                                 f"sharded on dim {p.placements[0].dim}: the generator indexes "
                                 "elements of the whole parameter, which a shard on another dim "
                                 "does not hold contiguously (Shard(0), as FSDP2, is supported)")
        if not warn:
            return
        warned = self.__dict__.setdefault("_rowless_warned", set())
        if rowless and not set(rowless) <= warned:
            warnings.warn(
                f"state_dtype='8bit': {', '.join(rowless[:8])}{' ...' if len(rowless) > 8 else ''}"
                f" keep float32 states: a DTensor parameter has 8-bit states only when it is "
                f"sharded on dim 0 (FSDP2) and each row holds whole {L.Q_BLOCK}-element blocks "
                "(2-D or more, row length a multiple of 256), so that every world size has the "
                "same blocks and checkpoints reshard", stacklevel=_cpu.caller_level())
            warned.update(rowless)
        if sd == "8bit" and group.get("allora_eta") is not None and any(
                p.numel() >= m8 and blocks_in_rows(p) for p in group["params"]):
            # 8-bit asked for and not given (the memory a user plans with): said once per group
            # of this optimizer (by index: a load replaces the group dicts)
            gi = next((i for i, g in enumerate(self.param_groups) if g is group), None)
            warned = self.__dict__.setdefault("_allora_8bit_warned", set())
            if gi not in warned:
                warned.add(gi)
                warnings.warn(
                    f"state_dtype='8bit': param_groups[{gi}] has ALLoRA (allora_eta="
                    f"{group['allora_eta']!r}); its tensors keep float32 states (4 B an element "
                    "of each state, not ~1): a program of the ALLoRA units kernel owns whole "
                    f"units (rows, columns or the tensor), which do not hold whole {L.Q_BLOCK}-"
                    "element blocks of 8-bit states (ALLoRA trains LoRA adapters, a small share "
                    "of the states). state_dtype=torch.bfloat16 on this group halves them",
                    stacklevel=_cpu.caller_level())

    @property
    def seed(self) -> int:
        """The seed of stochastic rounding (in the state dict; settable between steps)."""
        return self._seed

    @seed.setter
    def seed(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**64:
            raise ValueError(f"seed must be an integer in [0, 2**64), got {value!r}")
        self._seed = value
        self._tables.invalidate()

    @staticmethod
    def _storage(p: torch.Tensor, group: dict[str, Any]):
        """The storage of ``p``'s states: a torch dtype or ``"8bit"`` (decided on the whole
        parameter's size, the same on every rank)."""
        sd = group.get("state_dtype")
        if sd == "8bit":
            # ALLoRA tensors keep float32 states as small ones do: a program of the Triton
            # units kernel owns whole units, which do not hold whole 256-element blocks; they
            # are LoRA adapters, a small share of the states (the base model is frozen)
            small = p.numel() < group.get("min_8bit_size", _lowp.MIN_8BIT_SIZE)
            # and DTensors whose blocks would depend on the sharding (blocks_in_rows)
            return torch.float32 if small or group.get("allora_eta") is not None \
                or not blocks_in_rows(p) else "8bit"
        if sd is None:
            return torch.float32 if group.get("master_weights") else p.dtype
        return sd

    def _new_state(self, p, group, state, name: str) -> None:
        """A zero state ``name`` of ``p`` in the group's storage (codes + scales for 8-bit)."""
        store = self._storage(p, group)
        if store == "8bit":
            state[name + "_code"] = torch.zeros_like(p, dtype=torch.uint8)
            state[name + "_scale"] = _like(p, torch.zeros(
                scale_shape(p, shard=True), dtype=torch.float32, device=local(p).device),
                scale_shape(p))
        else:
            state[name] = torch.zeros_like(p, dtype=store, memory_format=torch.preserve_format)

    def _convert_states(self, p, group, state) -> None:
        """States (and the master) into the group's storage: a full-precision state (a torch
        checkpoint, or ``state_dtype`` changed) is quantised, codes of a group that is no
        longer 8-bit are dequantised; every state follows ``p``'s layout."""
        store = self._storage(p, group)
        for k, name in enumerate(self._state_names):
            signed = k != 1  # exp_avg_sq is the one unsigned state
            v, codes = state.get(name), state.get(name + "_code")
            if store == "8bit" and isinstance(v, torch.Tensor) and v.shape == p.shape:
                state[name + "_code"], state[name + "_scale"] = quantize_like(p, v, signed)
                del state[name]
            elif store != "8bit" and isinstance(codes, torch.Tensor):
                scale = state.pop(name + "_scale")
                state[name] = dequantize_like(p, codes, scale, signed).to(store)
                del state[name + "_code"]
            elif store != "8bit" and isinstance(v, torch.Tensor) and v.shape == p.shape and (
                    v.stride() != p.stride() or v.dtype != store or v.device != p.device):
                # p.data replaced since the state was made (model.to(memory_format=
                # torch.channels_last)), or another storage: the kernels walk p and its
                # states as flat arrays in one layout
                state[name] = torch.empty_like(p, dtype=store).copy_(v)
            elif store == "8bit" and isinstance(codes, torch.Tensor) \
                    and not _scale_fits(p, codes, state.get(name + "_scale")):
                scale = state.get(name + "_scale")
                if not isinstance(scale, torch.Tensor):
                    raise ValueError(f"8-bit state {name!r} has codes but no {name}_scale")
                if not is_dtensor(p) and not is_dtensor(scale) and not is_dtensor(codes) \
                        and scale.numel() == math.prod(scale_shape(p)) \
                        and codes.stride() == p.stride():
                    # the same blocks, saved flat (checkpoints before the row layout)
                    state[name + "_scale"] = scale.reshape(scale_shape(p)).to(p.device)
                else:  # another layout or sharding: decoded whole, quantised in p's blocks
                    full = _full_values(codes, scale, signed, name)
                    state[name + "_code"], state[name + "_scale"] = quantize_like(p, full,
                                                                                  signed)
            elif store == "8bit" and isinstance(codes, torch.Tensor):
                if codes.device != p.device or codes.stride() != p.stride():
                    full = dequantize_like(codes, codes, state[name + "_scale"], signed)
                    state[name + "_code"], state[name + "_scale"] = quantize_like(p, full,
                                                                                  signed)
        if group.get("master_weights"):
            m = state.get("master_param")
            if not isinstance(m, torch.Tensor) or m.shape != p.shape:
                state["master_param"] = torch.empty_like(p, dtype=torch.float32).copy_(p)
            elif m.dtype != torch.float32 or m.stride() != p.stride() or m.device != p.device:
                state["master_param"] = torch.empty_like(p, dtype=torch.float32).copy_(m)
        else:
            # master_weights turned off: the parameter is the weight from here on
            state.pop("master_param", None)

    def _state_tensor(self, p, group, name: str):
        return self.state[p].get(name + "_code" if self._storage(p, group) == "8bit" else name)

    def _lowp_entry(self, p, group, position: int) -> LowP | None:
        """The table builder's view of ``p``'s storage (None: all in ``p``'s dtype)."""
        store = self._storage(p, group)
        mw, sr = group.get("master_weights", False), group.get("stochastic_rounding", False)
        if store == p.dtype and not mw and not sr:
            return None
        st = self.state[p]
        mode = (L.MODE_MASTER if mw else 0) | (L.MODE_SR if sr else 0)
        scales = (None, None)
        if store == "8bit":
            names = self._state_names
            scales = (st.get(names[0] + "_scale"),
                      st.get(names[1] + "_scale") if len(names) > 1 else None)
            scales = tuple(None if s is None else local(s) for s in scales)
        key = _lowp.sr_key(self._seed, position) if sr else 0
        # the executors work on local shards: the master's too (a DTensor under FSDP2)
        master = st.get("master_param") if mw else None
        return LowP(L.STATE_8BIT if store == "8bit" else _lowp.STATE_CODES[store], mode,
                    None if master is None else local(master), scales, key,
                    _elem0(p) if sr else 0)

    # -- checkpoints ----------------------------------------------------------------------------
    def _check_lowp_states(self, sd: dict) -> None:
        """Before anything is loaded (torch's ``load_state_dict`` replaces groups and states at
        once; a failure after it would leave the optimizer half loaded, and a wrong dtype would
        be misread, not refused, by the reference backend): each 8-bit state of the checkpoint
        is ``<name>_code`` uint8 with ``<name>_scale`` float32, one scale per ``Q_BLOCK`` codes,
        as :meth:`_new_state` and :func:`quantize_like` make them, and not beside a full-precision
        ``<name>``; the states and the master are floating. ValueError naming the parameter and
        the key. (Shapes: :func:`._distributed.check_state_dict`.)"""
        state = sd["state"]
        for gi, (theirs, ours) in enumerate(zip(sd["param_groups"], self.param_groups)):
            names = ours.get("param_names")
            for i, pid in enumerate(theirs.get("params", [])):
                st = state.get(pid)
                if not isinstance(st, dict):
                    continue
                where = _param_name(names, i, gi)
                for name in self._state_names:
                    _check_8bit_entry(where, name, st)
                for k in (*self._state_names, "master_param"):
                    v = st.get(k)
                    if isinstance(v, torch.Tensor) and not v.is_floating_point():
                        raise ValueError(f"{where}: checkpoint state {k!r} has dtype {v.dtype}, "
                                         "a floating dtype expected")

    def _stash_lowp(self, sd: dict) -> dict:
        """Take the entries that torch's ``load_state_dict`` would cast to the parameter's dtype
        (it casts every floating state but ``step``: uint8 codes, float32 scales and masters, and
        states in another dtype than the parameter) out of ``sd``; returns them by index."""
        out: dict = {}
        state = sd.get("state", {})
        new_state = {}
        for pid, st in state.items():
            keep, taken = {}, {}
            for k, v in st.items():
                # (DTensors too: FSDP2's checkpoints come through here, and torch would cast a
                # float32 master or uint8 codes to a bf16 / fp32 parameter's dtype)
                if isinstance(v, torch.Tensor) and k != "step" and (
                        k == "master_param" or k.endswith(("_code", "_scale"))
                        or v.dtype in (torch.float32, torch.bfloat16)):
                    taken[k] = v
                else:
                    keep[k] = v
            new_state[pid] = keep
            if taken:
                out[pid] = taken
        sd["state"] = new_state
        return out

    def _restore_lowp(self, sd: dict, taken: dict) -> None:
        ids = [i for g in sd["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        by_id = dict(zip(ids, params))
        for pid, entries in taken.items():
            p = by_id.get(pid)
            if p is None:
                continue
            st = self.state[p]
            for k, v in entries.items():
                st[k] = v.to(p.device)

    def export_state_dict(self) -> dict[str, Any]:
        """The state dict in ``torch.optim``'s format: 8-bit states dequantised to float32
        under torch's names, masters and scales dropped, the options below fp32 left out of the
        groups. ``torch.optim.AdamW.load_state_dict`` reads it (and casts the states to the
        parameters' dtype, as it does for any checkpoint)."""
        sd = self.state_dict()
        sd.pop("fastsched", None)
        # torch's state_dict hands out the optimizer's own per-parameter dicts: the codes,
        # scales and master are taken out of copies (else the next step would find no master
        # and rebuild it from the rounded parameter, and would restart the 8-bit states)
        sd["state"] = {pid: dict(st) for pid, st in sd["state"].items()}
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, st in sd["state"].items():
            p = params[pid]
            for k, name in enumerate(self._state_names):
                if name + "_code" in st:
                    st[name] = dequantize_like(p, st.pop(name + "_code"),
                                               st.pop(name + "_scale"), k != 1)
            st.pop("master_param", None)
        for g in sd["param_groups"]:
            for k in LOWP_KEYS:
                g.pop(k, None)
            if g.get("allora_eta", 0) is None:  # no ALLoRA: none of its keys, as torch's
                for k in ("allora_eta", "allora_unit", "allora_apply"):
                    g.pop(k, None)
        return sd


def _check_8bit_entry(where: str, name: str, st: dict) -> None:
    """The 8-bit entries of state ``name`` in a checkpoint's per-parameter dict ``st`` (none, or
    uint8 codes and their float32 scales); ValueError naming the key and what is expected."""
    codes, scale = st.get(name + "_code"), st.get(name + "_scale")
    if codes is None and scale is None:
        return
    if name in st:
        raise ValueError(f"{where}: the checkpoint holds both {name!r} and its 8-bit "
                         f"{name}_code / {name}_scale: one state cannot be in two storages "
                         f"(keep either {name!r} or the codes and scales)")
    if not isinstance(codes, torch.Tensor) or codes.dtype != torch.uint8:
        raise ValueError(f"{where}: checkpoint state '{name}_code' must be a torch.uint8 tensor "
                         f"(8-bit codes), got {_what(codes)}")
    if not isinstance(scale, torch.Tensor) or scale.dtype != torch.float32:
        raise ValueError(f"{where}: checkpoint state '{name}_scale' must be a torch.float32 "
                         f"tensor (one scale per {L.Q_BLOCK} codes of '{name}_code'), got "
                         f"{_what(scale)}")
    if scale.numel() != _lowp.n_blocks(codes.numel()):
        raise ValueError(f"{where}: checkpoint state '{name}_scale' has {scale.numel()} scales "
                         f"for {codes.numel()} codes; {_lowp.n_blocks(codes.numel())} expected "
                         f"(one per {L.Q_BLOCK})")


def _what(v) -> str:
    if v is None:
        return "none"
    return f"dtype {v.dtype}" if isinstance(v, torch.Tensor) else type(v).__name__


def _elem0(p) -> int:
    """Index in the whole parameter of the local shard's first element (Shard(0) or plain)."""
    if not is_dtensor(p):
        return 0
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    row = 1
    for s in p.shape[1:]:
        row *= s
    return int(offset[0]) * row if p.dim() else 0

"""The shared machinery of the fused optimizers: validation, state, cached tables, backends,
gradient statistics, global-norm clipping, the non-finite guard, GradScaler support and ALLoRA."""

from __future__ import annotations

import abc
import math
import operator
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..schedules import Constant, Schedule, from_dict
from . import _distributed
from ._distributed import local

__all__ = ["FusedOptimizer", "BACKENDS", "NONFINITE", "ALLORA_UNITS"]

BACKENDS = ("auto", "triton", "reference")
NONFINITE = ("skip", "raise", "ignore")
ALLORA_UNITS = ("row", "column", "tensor")
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: 2048-element blocks with alignment hints: 2.99 TB/s on an H100 (99% of copy); 4096: 2.39 TB/s
DEFAULT_BLOCK = 2048
#: ALLoRA tiles (units per program, elements per chunk) by unit length: short rows (LoRA B,
#: out x r) would leave most lanes of a 256-wide chunk idle
_UNIT_CLASSES = ((16, 128, 16), (128, 16, 128), (None, 8, 256))


def _dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense: an elementwise kernel may walk its storage as a flat array."""
    if t.is_contiguous():
        return True
    sizes_strides = sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz != 1)
    expected = 1
    for st, sz in sizes_strides:
        if st != expected:
            return False
        expected *= sz
    return True


def _h2d(t: torch.Tensor, device) -> torch.Tensor:
    """Host table -> device without a host synchronisation (pinned, non-blocking on CUDA).

    A plain ``.to("cuda")`` from pageable memory synchronises the stream, which would break
    CUDA-graph capture and ``torch.cuda.set_sync_debug_mode("error")``.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def allora_units(p: torch.Tensor, unit: str) -> tuple[int, int, int, int]:
    """(unit length, unit stride, element stride, number of units) of a contiguous tensor.

    Rows and columns are those of ``p.reshape(p.shape[0], -1)``; a tensor with fewer than two
    dimensions is a single unit whatever ``unit`` says.
    """
    n = p.numel()
    if n == 0:
        return (0, 0, 1, 0)
    if p.dim() < 2 or unit == "tensor":
        return (n, 0, 1, 1)
    rows = p.shape[0]
    cols = n // rows
    if unit == "row":
        return (cols, cols, 1, rows)
    return (rows, 1, cols, cols)


@dataclass
class _Bucket:
    dtype: torch.dtype
    lo: int
    hi: int
    blocks: torch.Tensor
    n_blocks: int
    aligned: bool
    flag: bool
    units: int = 0  # ALLoRA tile: units per program (0: flat blocks)
    chunk: int = 0
    block_offset: int = 0  # first row of this bucket in the statistics partials


@dataclass
class _Plan:
    """Device tables for one parameter set (see ``fastsched.kernels.optim``)."""

    params: list[torch.Tensor]
    grads: list[torch.Tensor]
    group_index: list[int]
    ptr_key: tuple
    tensors: torch.Tensor | None = None
    scal: torch.Tensor | None = None
    buckets: list[_Bucket] = field(default_factory=list)  # update launches
    stat_buckets: list[_Bucket] = field(default_factory=list)  # statistics pass (all tensors)
    first_block: torch.Tensor | None = None
    partials: torch.Tensor | None = None
    tstat: torch.Tensor | None = None
    ustat: torch.Tensor | None = None
    host_rows: list[list[int]] = field(default_factory=list)
    # the state and step tensors the tables point at, kept alive: a state replaced behind the
    # optimizer's back must not leave the kernel writing into freed memory
    states: list[torch.Tensor] = field(default_factory=list)
    # distributed: the local shards of DTensor parameters and gradients (the tensors themselves
    # otherwise) and what is communicated (see _distributed.py; None: nothing)
    local_params: list[torch.Tensor] = field(default_factory=list)
    local_grads: list[torch.Tensor] = field(default_factory=list)
    dist: Any = None


class FusedOptimizer(torch.optim.Optimizer, metaclass=abc.ABCMeta):
    """Base class of the fused optimizers (see :class:`fastsched.Adam` for the user-facing docs).

    A step is: [statistics pass over g -> per-tensor reduce] -> finalize -> update, all launched
    on the device without a host synchronisation. Subclasses define ``_kind``, ``_state_names``,
    ``_validate_group``, ``_group_hyper``, ``_init_state`` and ``_run_reference``.
    """

    _kind: ClassVar[int]
    _state_names: ClassVar[tuple[str, ...]]

    def __init__(self, params, defaults: dict[str, Any], *, schedule: Schedule | None = None,
                 backend: str = "auto", block_size: int = DEFAULT_BLOCK,
                 max_grad_norm: float | None = None, stats: bool = False,
                 nonfinite: str | None = None, history: int = 0):
        if schedule is not None and not isinstance(schedule, Schedule):
            raise ValueError(f"schedule must be a fastsched.schedules.Schedule or None, got "
                             f"{schedule!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
        if (not isinstance(block_size, int) or block_size < 16
                or block_size & (block_size - 1)):
            raise ValueError(f"block_size must be a power of two >= 16, got {block_size!r}")
        if defaults.get("differentiable"):
            raise ValueError("differentiable=True is not supported by fastsched optimizers")
        if max_grad_norm is not None and (isinstance(max_grad_norm, bool) or not isinstance(
                max_grad_norm, int | float) or not math.isfinite(max_grad_norm)
                or max_grad_norm <= 0):
            raise ValueError(f"max_grad_norm must be a finite number > 0 or None, got "
                             f"{max_grad_norm!r}")
        if not isinstance(stats, bool):
            raise ValueError(f"stats must be a bool, got {stats!r}")
        if nonfinite is not None and nonfinite not in NONFINITE:
            raise ValueError(f"nonfinite must be one of {list(NONFINITE)} or None, got "
                             f"{nonfinite!r}")
        if isinstance(history, bool) or not isinstance(history, int) or history < 0:
            raise ValueError(f"history must be an integer >= 0 (0: no ring buffer), got "
                             f"{history!r}")
        self._backend_choice = backend
        self._block = block_size
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        # the statistics pass runs when anything needs the gradient norms
        self._stats_on = bool(stats or max_grad_norm is not None or history > 0
                              or nonfinite in ("skip", "raise"))
        self.nonfinite = nonfinite if nonfinite is not None else (
            "skip" if self._stats_on else "ignore")
        self._history_len = history
        self._plan: _Plan | None = None
        self._last_seen: tuple | None = None
        self._copied_grads = False
        self._group_key: tuple | None = None
        self._allora_key: tuple | None = None
        self._struct_key: tuple | None = None
        self._groups_dev: torch.Tensor | None = None
        self._clock: torch.Tensor | None = None
        self._sched_dev: torch.Tensor | None = None
        self._device: torch.device | None = None
        self._dev_stats: dict[str, torch.Tensor] | None = None
        self._tensor_stats = stats
        self._mesh = None  # distributed: None (no group yet), False (plain tensors) or a mesh
        self.schedule = schedule if schedule is not None else Constant(1.0)
        super().__init__(params, defaults)

    # -- parameter groups ---------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        n_before = len(self.param_groups)
        super().add_param_group(param_group)  # normalises params (and named params)
        group = self.param_groups[-1]
        try:
            self._check_new_group(group)
        except Exception:
            del self.param_groups[n_before:]
            raise
        self._plan = None
        self._group_key = None

    def _check_new_group(self, group: dict[str, Any]) -> None:
        seen: set[int] = set()
        device = self._device
        for i, p in enumerate(group["params"]):
            if p.is_complex():
                raise ValueError(f"params[{i}]: complex parameters are not supported by "
                                 "fastsched optimizers (view them as real with "
                                 "torch.view_as_real)")
            if p.dtype not in _FLOAT_DTYPES:
                raise ValueError(f"params[{i}]: dtype must be one of float32, bfloat16, "
                                 f"float16, got {p.dtype}")
            if p.is_sparse:
                raise ValueError(f"params[{i}]: sparse parameters are not supported")
            if not _dense(p):
                raise ValueError(f"params[{i}]: parameters must be dense in memory (contiguous "
                                 f"or a permutation of contiguous), got strides {p.stride()} "
                                 f"for shape {tuple(p.shape)}")
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
        self._validate_group(group)
        self._validate_allora(group)
        # distributed: DTensor placements (1-D mesh, Shard/Replicate, one mesh), else ValueError
        self._mesh = _distributed.check_params(group["params"], group.get("param_names"),
                                               len(self.param_groups) - 1, self._mesh)
        if group["allora_eta"] is not None:
            for i, p in enumerate(group["params"]):
                if not p.is_contiguous():
                    raise ValueError(f"params[{i}]: ALLoRA units need contiguous parameters, "
                                     f"got strides {p.stride()}")
        self._device = device

    @staticmethod
    def _validate_allora(group: dict[str, Any]) -> None:
        eta, unit = group.get("allora_eta"), group.get("allora_unit", "row")
        if eta is not None and (isinstance(eta, bool) or not isinstance(eta, int | float)
                                or not math.isfinite(eta) or eta <= 0):
            raise ValueError(f"allora_eta must be a finite number > 0 or None, got {eta!r}")
        if unit not in ALLORA_UNITS:
            raise ValueError(f"allora_unit must be one of {list(ALLORA_UNITS)}, got {unit!r}")

    @abc.abstractmethod
    def _validate_group(self, group: dict[str, Any]) -> None:
        """Raise ValueError (worded like torch) for invalid hyperparameters of a group."""

    @abc.abstractmethod
    def _group_hyper(self, group: dict[str, Any]) -> tuple[float, ...]:
        """The group's row of the device hyperparameter table (see kernels.optim)."""

    @abc.abstractmethod
    def _init_state(self, p: torch.Tensor, group: dict[str, Any], state: dict) -> None:
        """Create the parameter's state tensors that do not exist yet."""

    def _full_hyper(self, group) -> tuple[float, ...]:
        eta = group.get("allora_eta")
        return self._group_hyper(group) + (0.0 if eta is None else 1.0 / float(eta) ** 2, 0.0)

    def _group_struct(self, group) -> tuple:
        """What decides the tables' shape: state tensors present and ALLoRA units."""
        h = self._group_hyper(group)
        unit = group.get("allora_unit") if group.get("allora_eta") is not None else None
        return (h[6], h[7], unit)

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

    # -- backend ------------------------------------------------------------------------------
    @property
    def backend(self) -> str:
        """The backend that runs the step: ``"triton"`` or ``"reference"``."""
        if self._backend_choice != "auto":
            return self._backend_choice
        dev = self._device
        return "triton" if dev is not None and dev.type == "cuda" else "reference"

    def _check_backend(self) -> str:
        b = self.backend
        if b == "triton" and self._device is not None and self._device.type != "cuda" \
                and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before "
                             "triton is imported; use backend='reference' (the default on CPU)")
        return b

    # -- per-step preparation -----------------------------------------------------------------
    def _collect(self):
        self._copied_grads = False
        params, grads, gidx = [], [], []
        for gi, group in enumerate(self.param_groups):
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                if g.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse "
                                       "gradients")
                if g.dtype != p.dtype or g.shape != p.shape:
                    raise RuntimeError(f"gradient of dtype {g.dtype} and shape "
                                       f"{tuple(g.shape)} does not match its parameter "
                                       f"({p.dtype}, {tuple(p.shape)})")
                if g.device != p.device:
                    raise RuntimeError(f"gradient on {g.device} for a parameter on {p.device}")
                if local(g).stride() != local(p).stride():
                    # the kernel walks p, g and the states as one flat array each: a gradient
                    # laid out differently costs one copy (read + write of g) this step
                    g = torch.empty_like(p).copy_(g)
                    self._copied_grads = True
                params.append(p)
                grads.append(g)
                gidx.append(gi)
        return params, grads, gidx

    def _ensure_state(self, params, gidx) -> None:
        for p, gi in zip(params, gidx):
            state = self.state[p]
            if "step" not in state:
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            elif not isinstance(state["step"], torch.Tensor) or state["step"].device != p.device \
                    or state["step"].dtype != torch.float32:
                state["step"] = torch.as_tensor(state["step"], dtype=torch.float32).to(p.device)
            for name in self._state_names:
                # p.data replaced since the state was made (model.to(memory_format=
                # torch.channels_last)): the kernel walks p and its states as flat arrays of
                # p's dtype, so the states follow p's layout and dtype, as after a load
                v = state.get(name)
                if isinstance(v, torch.Tensor) and v.shape == p.shape and (
                        v.stride() != p.stride() or v.dtype != p.dtype or v.device != p.device):
                    state[name] = torch.empty_like(p).copy_(v)
            self._init_state(p, self.param_groups[gi], state)

    def _refresh_groups(self, device) -> None:
        # lr, betas, ... are re-read every step (changing group["lr"] takes effect at the next
        # step); the device table is rewritten only when a value changed, and the tensor tables
        # are rebuilt only when the set of state tensors or the ALLoRA units change
        key = tuple(self._full_hyper(g) for g in self.param_groups)
        # the table holds 1/eta^2 only: eta = -1 would pass for 1, and the unit not at all
        allora = tuple((g.get("allora_eta"), g.get("allora_unit")) for g in self.param_groups)
        if key != self._group_key or allora != self._allora_key or self._groups_dev is None:
            for g in self.param_groups:
                self._validate_group(g)
                self._validate_allora(g)
            struct = tuple(self._group_struct(g) for g in self.param_groups)
            if struct != self._struct_key:
                self._plan = None
                self._struct_key = struct
            self._groups_dev = _h2d(torch.tensor(key, dtype=torch.float64), device)
            self._group_key = key
            self._allora_key = allora

    def _refresh_clock(self, device) -> None:
        if self._clock is None or self._clock.device != device:
            self._clock = (torch.zeros(1, dtype=torch.int64, device=device) if self._clock is None
                           else self._clock.to(device))
        if self._sched_dev is None or self._sched_dev.device != device:
            self._sched_dev = self.schedule.table(device)
        if self._stats_on and (self._dev_stats is None
                               or self._dev_stats["global"].device != device):
            from ..kernels.optim import GSTATS

            n_hist = max(self._history_len, 1)
            self._dev_stats = {
                "global": torch.zeros(GSTATS, dtype=torch.float64, device=device),
                "lr": torch.zeros(len(self.param_groups), dtype=torch.float64, device=device),
                "history": torch.zeros((n_hist, 5), dtype=torch.float64, device=device),
                "history_pos": torch.zeros(1, dtype=torch.int64, device=device),
                "cfg": _h2d(torch.tensor([self.max_grad_norm or 0.0, 0.0],
                                         dtype=torch.float64), device),
            }
        if self._stats_on and self._dev_stats["lr"].numel() != len(self.param_groups):
            self._dev_stats["lr"] = torch.zeros(len(self.param_groups), dtype=torch.float64,
                                                device=device)

    def _state_tensor(self, p, name, group) -> torch.Tensor | None:
        return self.state[p].get(name)

    def _block_table(self, counts: torch.Tensor, first_index: int, per: int, device):
        tidx = torch.repeat_interleave(torch.arange(first_index, first_index + len(counts)),
                                       counts)
        first = torch.cumsum(counts, 0) - counts
        local = torch.arange(int(counts.sum())) - torch.repeat_interleave(first, counts)
        return _h2d(torch.stack([tidx, local * per], 1).contiguous(), device)

    def _build_plan(self, params, grads, gidx, ptr_key) -> _Plan:
        device = params[0].device
        units_of = [self.param_groups[gi].get("allora_unit")
                    if self.param_groups[gi].get("allora_eta") is not None else None
                    for gi in gidx]
        # the kernels and the reference work on local shards (FSDP2 shards dim 0: rows whole)
        unit_info = [allora_units(local(p), u) if u is not None else (0, 0, 0, 0)
                     for p, u in zip(params, units_of)]

        def uclass(i):
            if units_of[i] is None:
                return -1
            ulen = unit_info[i][0]
            return next(k for k, (hi, _, _) in enumerate(_UNIT_CLASSES)
                        if hi is None or ulen <= hi)

        # buckets: (dtype, update kind) -> one launch each (both are compile-time constants)
        order = sorted(range(len(params)),
                       key=lambda i: (_FLOAT_DTYPES.index(params[i].dtype), uclass(i)))
        params = [params[i] for i in order]
        grads = [grads[i] for i in order]
        gidx = [gidx[i] for i in order]
        classes = [uclass(i) for i in order]  # before unit_info is reordered: uclass reads it
        unit_info = [unit_info[i] for i in order]
        units_of = [units_of[i] for i in order]
        rows = []
        for p, g, gi, ui in zip(params, grads, gidx, unit_info):
            st = [self._state_tensor(p, n, self.param_groups[gi]) for n in self._state_names]
            st += [None] * (3 - len(st))
            rows.append([local(p).data_ptr(), local(g).data_ptr()]
                        + [0 if s is None else local(s).data_ptr() for s in st]
                        + [self.state[p]["step"].data_ptr(), local(p).numel(), gi] + list(ui))
        plan = _Plan(params, grads, gidx, ptr_key, host_rows=rows,
                     states=[t for p in params for t in self.state[p].values()
                             if isinstance(t, torch.Tensor)],
                     local_params=[local(p) for p in params],
                     local_grads=[local(g) for g in grads],
                     dist=_distributed.dist_plan(params, units_of, device))
        if self.backend != "triton":
            return plan
        if plan.dist is not None:
            names = dict(zip(map(id, params), self._names_of(params)))
            _distributed.check_units(params, units_of, lambda p: names[id(p)])
        n = len(params)
        plan.tensors = _h2d(torch.tensor(rows, dtype=torch.int64), device)
        plan.scal = torch.zeros((n, 12), dtype=torch.float32, device=device)
        numels = torch.tensor([p.numel() for p in params], dtype=torch.int64)
        # flat blocks of every tensor (statistics pass; update of non-ALLoRA tensors)
        flat_counts = (numels + self._block - 1) // self._block
        keys = [(p.dtype, c) for p, c in zip(params, classes)]
        lo = 0
        while lo < n:
            hi = lo
            while hi < n and keys[hi] == keys[lo]:
                hi += 1
            dtype, cls = keys[lo]
            rs = rows[lo:hi]
            flag = any(r[4] != 0 or (self._kind == 1 and r[2] != 0) for r in rs)
            if cls < 0:
                blocks = self._block_table(flat_counts[lo:hi], lo, self._block, device)
                aligned = all(a % 16 == 0 for r in rs for a in r[:5] if a)
                plan.buckets.append(_Bucket(dtype, lo, hi, blocks, blocks.shape[0], aligned,
                                            flag))
            else:
                _, nu, chunk = _UNIT_CLASSES[cls]
                tiles = torch.tensor([(ui[3] + nu - 1) // nu for ui in unit_info[lo:hi]],
                                     dtype=torch.int64)
                blocks = self._block_table(tiles, lo, nu, device)
                plan.buckets.append(_Bucket(dtype, lo, hi, blocks, blocks.shape[0], False, flag,
                                            nu, chunk))
            lo = hi
        if self._stats_on:
            first = torch.zeros(n + 1, dtype=torch.int64)
            first[1:] = torch.cumsum(flat_counts, 0)
            plan.first_block = _h2d(first, device)
            plan.partials = torch.zeros((max(int(first[-1]), 1), 4), dtype=torch.float32,
                                        device=device)
            plan.tstat = torch.zeros((n, 4), dtype=torch.float64, device=device)
            plan.ustat = torch.zeros((n, 2), dtype=torch.float32, device=device)
            lo = 0
            while lo < n:
                hi = lo
                while hi < n and params[hi].dtype == params[lo].dtype:
                    hi += 1
                blocks = self._block_table(flat_counts[lo:hi], lo, self._block, device)
                aligned = all(r[1] % 16 == 0 for r in rows[lo:hi])
                plan.stat_buckets.append(_Bucket(params[lo].dtype, lo, hi, blocks,
                                                 blocks.shape[0], aligned, False,
                                                 block_offset=int(first[lo])))
                lo = hi
        return plan

    def _prepare(self) -> _Plan | None:
        # fast path, the common case: the same gradient tensors as last step (grads zeroed in
        # place, or static grads under CUDA graphs) and parameters still at the same addresses
        # (``p.data = ...`` moves them). 2000 tensors: ~0.3 ms of host time instead of ~16 ms.
        flat = [p for g in self.param_groups for p in g["params"]]
        cur_grads = [p.grad for p in flat]
        if self._mesh:  # a DTensor's own data_ptr() is 0: key on the local shard
            cur_ptrs = [local(p).data_ptr() for p in flat]
        else:
            cur_ptrs = [p.data_ptr() for p in flat]
        # and the same per-parameter state dicts (opt.state.clear(), opt.state[p] = {} or
        # popping an entry reset a state, as in torch; replacing one tensor inside a state dict
        # is not seen here: modify states in place or through load_state_dict)
        states = list(self.state.values())
        n_states = sum(map(len, states))
        last = self._last_seen
        if (self._plan is not None and last is not None and cur_ptrs == last[1]
                and len(cur_grads) == len(last[0]) and all(map(operator.is_, cur_grads, last[0]))
                and len(states) == len(last[2]) and all(map(operator.is_, states, last[2]))
                and n_states == last[3]):
            return self._plan
        plan = self._prepare_slow()
        states = list(self.state.values())
        self._last_seen = None if self._copied_grads else (cur_grads, cur_ptrs, states,
                                                           sum(map(len, states)))
        return plan

    def _follow_device(self) -> None:
        """The model was moved after the optimizer was built (``model.cuda()``): follow it, with
        the backend that device gets, and rebuild every device table there. Only the first
        parameter is looked at here; a partial move is refused by the slow path."""
        for g in self.param_groups:
            if g["params"]:
                device = local(g["params"][0]).device
                if device != self._device:
                    self._device = device
                    self._plan = None
                    self._groups_dev = None
                    self._group_key = None
                return

    def _prepare_slow(self) -> _Plan | None:
        params, grads, gidx = self._collect()
        if not params:
            return None
        devices = {local(p).device for p in params}
        if len(devices) > 1:
            raise RuntimeError(f"fastsched optimizers need all parameters on one device; they "
                               f"are now on {sorted(map(str, devices))} (moved after the "
                               "optimizer was built?)")
        if devices != {self._device}:
            raise RuntimeError(f"fastsched optimizers need all parameters on one device; they "
                               f"are now on {sorted(map(str, devices))}")
        # the states' addresses are part of the key: states reset between steps rebuild the tables
        self._ensure_state(params, gidx)
        ptr_key = tuple((local(p).data_ptr(), local(g).data_ptr(), gi,
                         tuple(local(t).data_ptr() for t in self.state[p].values()
                               if isinstance(t, torch.Tensor)))
                        for p, g, gi in zip(params, grads, gidx))
        plan = self._plan
        if plan is not None and plan.ptr_key == ptr_key:
            return plan
        if plan is not None and len(plan.ptr_key) == len(ptr_key) and all(
                a[0] == b[0] and a[2:] == b[2:] for a, b in zip(plan.ptr_key, ptr_key)) \
                and self.backend == "triton":
            # same parameters, new gradient tensors (zero_grad(set_to_none=True)): only the
            # gradient column changes; one small host-to-device copy
            by_param = {local(p).data_ptr(): g for p, g in zip(params, grads)}
            plan.grads = [by_param[local(p).data_ptr()] for p in plan.params]
            plan.local_grads = [local(g) for g in plan.grads]
            gcol = [g.data_ptr() for g in plan.local_grads]
            for r, a in zip(plan.host_rows, gcol):
                r[1] = a
            gdev = _h2d(torch.tensor(gcol, dtype=torch.int64), plan.tensors.device)
            plan.tensors[:, 1].copy_(gdev)
            for b in plan.buckets:
                if not b.units:
                    b.aligned = all(a % 16 == 0 for r in plan.host_rows[b.lo:b.hi]
                                    for a in r[:5] if a)
            for b in plan.stat_buckets:
                b.aligned = all(r[1] % 16 == 0 for r in plan.host_rows[b.lo:b.hi])
            plan.ptr_key = ptr_key
            return plan
        self._plan = self._build_plan(params, grads, gidx, ptr_key)
        return self._plan

    # -- step ---------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        """Perform one optimization step (no host synchronisation; CUDA-graph capturable).

        The learning rate of group ``i`` at this step is ``group["lr"] * schedule(clock)``; the
        clock (``self.clock``) then advances by one, unless the step was skipped.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._follow_device()
        backend = self._check_backend()
        self._refresh_groups(self._device)
        plan = self._prepare()
        if plan is None:
            return loss
        self._refresh_clock(self._device)
        # torch.amp.GradScaler sets these on optimizers with _step_supports_amp_scaling, as for
        # torch's fused optimizers: unscaling and the skip are fused into the step
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        if backend == "triton":
            self._run_triton(plan, grad_scale, found_inf)
        else:
            self._run_reference_step(plan, grad_scale, found_inf)
        return loss

    _step_supports_amp_scaling = True

    def _run_triton(self, plan: _Plan, grad_scale, found_inf) -> None:
        from ..kernels.optim import (
            launch_finalize,
            launch_grad_stats,
            launch_reduce,
            launch_units_update,
            launch_update,
        )

        tl_dtypes = _tl_dtypes()
        st = self._dev_stats
        if self._stats_on:
            for b in plan.stat_buckets:
                launch_grad_stats(plan.tensors, b.blocks, plan.partials[b.block_offset:],
                                  b.n_blocks, tl_dtypes[b.dtype], self._block, b.aligned,
                                  self.nonfinite != "ignore")
            launch_reduce(plan.first_block, plan.partials, plan.tstat, len(plan.params))
            if plan.dist is not None:  # distributed: global per-tensor sums (one all-reduce)
                plan.dist.reduce_rows(plan.tstat)
        gs = fi = None
        if grad_scale is not None:
            gs = grad_scale.reshape(-1)
            fi = (found_inf if found_inf is not None else torch.zeros_like(gs)).reshape(-1)
        elif found_inf is not None:
            # after an explicit scaler.unscale_(opt), GradScaler.step sets grad_scale = None but
            # found_inf still decides the skip
            fi = found_inf.reshape(-1)
            gs = torch.ones_like(fi)
        launch_finalize(
            plan.tensors, self._groups_dev, plan.scal, self._sched_dev, self._clock,
            len(plan.params), self._kind,
            cfg=st["cfg"] if st else plan.scal, tstat=plan.tstat, ustat=plan.ustat,
            gstat=st["global"] if st else None, lr_out=st["lr"] if st else None,
            hist=st["history"] if st else None, hist_pos=st["history_pos"] if st else None,
            hist_len=self._history_len, grad_scale=gs, found_inf=fi, stats=self._stats_on,
            clip=self.max_grad_norm is not None, guard=self.nonfinite != "ignore",
            history=self._history_len > 0)
        for b in plan.buckets:
            if b.units:
                launch_units_update(self._kind, plan.tensors, b.blocks, plan.scal, plan.ustat,
                                    b.n_blocks, tl_dtypes[b.dtype], b.units, b.chunk, b.flag,
                                    self._stats_on)
            else:
                launch_update(self._kind, plan.tensors, b.blocks, plan.scal, plan.ustat,
                              b.n_blocks, tl_dtypes[b.dtype], self._block, b.aligned, b.flag,
                              self._stats_on)
        if plan.dist is not None and self._tensor_stats:  # whole-tensor norms (stats=True)
            plan.dist.reduce_rows(plan.ustat)

    def _run_reference_step(self, plan: _Plan, grad_scale, found_inf) -> None:
        from ._reference import allora_scales, grad_statistics

        gm = active = None
        if self._stats_on or grad_scale is not None or found_inf is not None:
            gm, active, out = grad_statistics(
                plan.local_grads, max_grad_norm=self.max_grad_norm,
                guard=self.nonfinite != "ignore" and self._stats_on, grad_scale=grad_scale,
                found_inf=found_inf, reduce=plan.dist and plan.dist.reduce_rows)
            if self._stats_on:
                self._reference_stats(plan, out, active)
        scales = [None] * len(plan.params)
        for i, (p, gi) in enumerate(zip(plan.local_params, plan.group_index)):
            g = self.param_groups[gi]
            if g.get("allora_eta") is not None:
                red = None if plan.dist is None else (
                    lambda t, i=i: plan.dist.reduce_units(i, t))
                scales[i] = allora_scales(p, g["allora_unit"], float(g["allora_eta"]), red)
        upd = self._run_reference(plan, gm, active, scales)
        if plan.dist is not None and self._tensor_stats:  # whole-tensor norms (stats=True)
            upd = plan.dist.reduce_rows(upd)
        if self._stats_on:
            self._plan_ustat = upd

    def _reference_stats(self, plan, out, active) -> None:
        st = self._dev_stats
        g = st["global"]
        clock = self._clock
        f = self.schedule.evaluate(clock.reshape(1))[0]
        lr0 = f * self._group_key[0][0]
        skipped = (~active).to(torch.float64)
        g[0] = out["grad_norm"]
        g[1] = out["grad_norm_l1"]
        g[2] = out["clip_coef"]
        g[3] = skipped
        g[4] += skipped
        g[5] = out["nonfinite"]
        g[6] = lr0
        g[7] = out["inv_scale"]
        st["lr"].copy_(torch.stack([f * k[0] for k in self._group_key]))
        self._ref_tensor_norms = out["tensor_norms"]
        if self._history_len:
            slot = st["history_pos"] % self._history_len
            st["history"][slot] = torch.stack([clock.to(torch.float64).reshape(()),
                                               out["grad_norm"], lr0, skipped,
                                               out["grad_norm_l1"]])
            st["history_pos"] += 1

    @abc.abstractmethod
    def _run_reference(self, plan: _Plan, grad_mul, active, scales):
        """The step through the PyTorch reference; returns per-tensor (sum p^2, sum u^2)."""

    # -- statistics ---------------------------------------------------------------------------
    @property
    def stats(self) -> dict[str, torch.Tensor]:
        """Device tensors of the last step's statistics (read them when you choose to).

        ``grad_norm`` (global L2 of the unscaled gradients, before clipping), ``grad_norm_l1``,
        ``clip_coef``, ``skipped`` (1.0 if the last step was skipped), ``skip_count``,
        ``nonfinite`` (non-finite gradient elements), ``lr`` (per group, as applied),
        ``tensor_grad_norm``, ``tensor_param_norm`` and ``tensor_update_rms`` (per tensor with a
        gradient, in :meth:`stats_names` order). Empty until a step ran with statistics on.
        """
        if not self._stats_on:
            raise RuntimeError("statistics are off: construct the optimizer with stats=True, "
                               "max_grad_norm=..., history=N or nonfinite='skip'|'raise'")
        st = self._dev_stats
        plan = self._plan
        if st is None or plan is None:
            return {}
        g = st["global"]
        out = {"grad_norm": g[0], "grad_norm_l1": g[1], "clip_coef": g[2], "skipped": g[3],
               "skip_count": g[4], "nonfinite": g[5], "lr": st["lr"]}
        numel = torch.tensor([max(p.numel(), 1) for p in plan.params], dtype=torch.float64,
                             device=g.device)
        if self.backend == "triton":
            out["tensor_grad_norm"] = plan.tstat[:, 3]
            ustat = plan.ustat.to(torch.float64)
        else:
            out["tensor_grad_norm"] = self._ref_tensor_norms
            ustat = self._plan_ustat
        out["tensor_param_norm"] = ustat[:, 0].sqrt()
        out["tensor_update_rms"] = (ustat[:, 1] / numel).sqrt()
        if self._history_len:
            out["history"] = st["history"]
            out["history_pos"] = st["history_pos"]
        return out

    def stats_names(self) -> list[str]:
        """Names of the tensors in the per-tensor statistics (parameter names when the optimizer
        was given ``named_parameters()``, else ``"group{g}.param{i}"``)."""
        if self._plan is None:
            return []
        return self._names_of(self._plan.params)

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
        host = {k: v.detach().cpu() for k, v in st.items()}
        names = self.stats_names()
        out: dict[str, Any] = {k: float(host[k]) for k in
                               ("grad_norm", "grad_norm_l1", "clip_coef", "nonfinite")}
        out["skipped"] = bool(host["skipped"] > 0)
        out["skip_count"] = int(host["skip_count"])
        out["lr"] = host["lr"].tolist()
        skipped = out["skipped"]
        out["tensors"] = {
            n: {"grad_norm": float(host["tensor_grad_norm"][i]),
                "param_norm": None if skipped else float(host["tensor_param_norm"][i]),
                "update_rms": None if skipped else float(host["tensor_update_rms"][i])}
            for i, n in enumerate(names)}
        if self._history_len:
            out["history"] = self._history_host(host["history"], int(host["history_pos"]))
        if self.nonfinite == "raise":
            seen = getattr(self, "_raised_skips", 0)
            self._raised_skips = out["skip_count"]
            if out["skip_count"] > seen:
                raise FloatingPointError(
                    f"{out['skip_count'] - seen} step(s) had non-finite gradients and were "
                    f"skipped (last global grad norm {out['grad_norm']})")
        return out

    def _history_host(self, hist: torch.Tensor, pos: int) -> dict[str, list]:
        n = self._history_len
        k = min(pos, n)
        idx = [(pos - k + i) % n for i in range(k)]
        rows = hist[idx]
        return {"step": rows[:, 0].long().tolist(), "grad_norm": rows[:, 1].tolist(),
                "grad_norm_l1": rows[:, 4].tolist(), "lr": rows[:, 2].tolist(),
                "skipped": (rows[:, 3] > 0).tolist()}

    def grad_norm_history(self) -> dict[str, list]:
        """The ring buffer of the last ``history`` steps (oldest first): steps, global L2 and L1
        gradient norms, learning rates of group 0 and skip flags. Synchronises once."""
        if not self._history_len:
            raise RuntimeError("no ring buffer: construct the optimizer with history=N")
        if self._dev_stats is None:
            return {"step": [], "grad_norm": [], "grad_norm_l1": [], "lr": [], "skipped": []}
        return self._history_host(self._dev_stats["history"].cpu(),
                                  int(self._dev_stats["history_pos"].item()))

    # -- clock and schedule -------------------------------------------------------------------
    @property
    def clock(self) -> torch.Tensor:
        """The schedule's step counter: a 1-element int64 tensor on the parameters' device."""
        if self._clock is None:
            self._refresh_clock(self._device or torch.device("cpu"))
        return self._clock

    def set_schedule(self, schedule: Schedule, clock: int | None = None) -> None:
        """Replace the schedule (and optionally the clock) between steps."""
        if not isinstance(schedule, Schedule):
            raise ValueError(f"schedule must be a fastsched.schedules.Schedule, got {schedule!r}")
        self.schedule = schedule
        self._sched_dev = None
        if clock is not None:
            if not isinstance(clock, int) or clock < 0:
                raise ValueError(f"clock must be an integer >= 0, got {clock!r}")
            self.clock.fill_(clock)

    def current_lr(self) -> list[float]:
        """Learning rate of each group at the next step (reads the clock: synchronises)."""
        f = self.schedule(int(self.clock.item()))
        return [float(self._check_lr(g["lr"])) * f for g in self.param_groups]

    # -- checkpoints --------------------------------------------------------------------------
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
                if not st:
                    continue
                self._upgrade_state(p, group, st)
        if extra is not None:
            self.schedule = from_dict(extra["schedule"])
            clock = int(extra["clock"])
        else:
            steps = [float(s["step"]) for s in self.state.values() if "step" in s]
            clock = int(max(steps)) if steps else 0
        self._sched_dev = None
        self._clock = torch.full((1,), clock, dtype=torch.int64,
                                 device=self._device or torch.device("cpu"))
        self._plan = None
        self._group_key = None
        self._struct_key = None

    def _upgrade_state(self, p, group, st) -> None:
        if "step" in st:
            st["step"] = torch.as_tensor(st["step"], dtype=torch.float32).to(p.device)
        for name in self._state_names:
            v = st.get(name)
            if isinstance(v, torch.Tensor):
                st[name] = v.to(device=p.device, dtype=p.dtype)
                if st[name].stride() != p.stride():
                    st[name] = torch.empty_like(p).copy_(st[name])


_TL_CACHE: dict = {}


def _tl_dtypes():
    if not _TL_CACHE:
        import triton.language as tl

        _TL_CACHE.update({torch.float32: tl.float32, torch.bfloat16: tl.bfloat16,
                          torch.float16: tl.float16})
    return _TL_CACHE

"""torch's face of the fused optimizers: parameter groups, validation, state, options, clock,
schedule and the dispatch of ``step()``.

What a step does lives elsewhere: the tables in :mod:`._tables` (the table builder), the passes
in :mod:`.functional` (one function per optimizer kind, every backend behind it), the decoding
of the statistics in :mod:`._stats`, checkpoints in :mod:`._checkpoint`, parameter groups and
their validation in :mod:`._groups`.
"""

from __future__ import annotations

import abc
import os
from itertools import chain
from typing import Any, ClassVar

import torch

from ..schedules import Constant, Schedule
from . import _cpu, _hostext
from ._buffers import StepBuffers
from ._checkpoint import CheckpointMixin
from ._distributed import local
from ._groups import ALLORA_UNITS, TRITON_DTYPES, GroupsMixin
from ._precision import PrecisionMixin
from ._stats import StatsMixin
from ._tables import DEFAULT_BLOCK, Entry, TableBuilder
from .functional import NONFINITE, StepOptions, run_step

__all__ = ["FusedOptimizer", "BACKENDS", "NONFINITE", "ALLORA_UNITS", "StepOptions"]

BACKENDS = ("auto", "triton", "cpu", "reference")

#: a TorchFunctionMode sees `p.grad` reads and writes in Python; the host helper would bypass it
_TF_MODE = torch._C._is_torch_function_mode_enabled
_PROFILING = torch._C._autograd._profiler_enabled


class FusedOptimizer(GroupsMixin, PrecisionMixin, StatsMixin, CheckpointMixin,
                     torch.optim.Optimizer, metaclass=abc.ABCMeta):
    """Base class of the fused optimizers (see :class:`fastsched.Adam` for the user-facing docs).

    Subclasses give ``_kind``, ``_state_names``, ``_validate_group``, ``_init_state``,
    ``_has_states`` (which states a group's parameters have) and ``_group_row`` (the group's
    row of the groups table, from ``functional.adam_row`` / ``sgd_row``).
    """

    _kind: ClassVar[int]
    _state_names: ClassVar[tuple[str, ...]]
    _step_supports_amp_scaling = True  # torch.amp.GradScaler hands over grad_scale / found_inf

    def __init__(self, params, defaults: dict[str, Any], *, schedule: Schedule | None = None,
                 backend: str = "auto", block_size: int = DEFAULT_BLOCK,
                 max_grad_norm: float | None = None, stats: bool = False,
                 nonfinite: str | None = None, history: int = 0, seed: int = 0):
        if schedule is not None and not isinstance(schedule, Schedule):
            raise ValueError(f"schedule must be a fastsched.schedules.Schedule or None, got "
                             f"{schedule!r}")
        self._check_choice(backend)
        if (not isinstance(block_size, int) or block_size < 16
                or block_size & (block_size - 1)):
            raise ValueError(f"block_size must be a power of two >= 16, got {block_size!r}")
        if defaults.get("differentiable"):
            raise ValueError("differentiable=True is not supported by fastsched optimizers")
        self._options = StepOptions(max_grad_norm, stats, nonfinite, history)
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
            raise ValueError(f"seed must be an integer in [0, 2**64), got {seed!r}")
        self._seed = seed
        self._backend_choice = backend
        self._tables = TableBuilder(self._kind, block_size)
        self._device: torch.device | None = None
        self._buffers: StepBuffers | None = None
        self._struct: tuple | None = None
        self._rows: tuple | None = None
        self._etas: tuple | None = None
        self._ran_stats = False  # the last step ran the statistics pass
        self._ran_tensor_stats = False  # ... and the per-tensor update statistics
        self._mesh = None  # distributed: None (no group yet), False (plain tensors) or a mesh
        self.schedule = schedule if schedule is not None else Constant(1.0)
        #: True: a group's lr may change between steps while a schedule (anything but the
        #: default ``Constant(1.0)``) is set, the new value taken as the base the schedule
        #: multiplies; False (default): such a change raises (an outside LR scheduler would
        #: otherwise multiply with the schedule silently)
        self.allow_lr_changes = False
        super().__init__(params, defaults)

    # -- options: one source, read by every backend at every step ------------------------------
    @property
    def options(self) -> StepOptions:
        """The step's options (:class:`fastsched.optim.StepOptions`); assign a new one (e.g.
        ``dataclasses.replace(opt.options, stats=True)``) to change them between steps."""
        return self._options

    @options.setter
    def options(self, value: StepOptions) -> None:
        if not isinstance(value, StepOptions):
            raise ValueError(f"options must be a fastsched.optim.StepOptions, got {value!r}")
        if value.history != self._options.history and self._buffers is not None:
            self._buffers = self._buffers.moved(self._buffers.device, value.history)
        self._options = value

    @property
    def max_grad_norm(self) -> float | None:
        """Clip by the global L2 norm; None: off. Settable between steps (then the statistics
        pass starts or stops at the next step, and ``nonfinite=None`` follows it)."""
        return self._options.max_grad_norm

    @max_grad_norm.setter
    def max_grad_norm(self, value) -> None:
        self.options = StepOptions(value, self._options.stats, self._options.nonfinite,
                                   self._options.history)

    @property
    def nonfinite(self) -> str:
        """The non-finite mode in effect: ``"skip"``, ``"raise"`` or ``"ignore"``. Set a mode,
        or None for the default (``"skip"`` when clipping, ``stats`` or ``history`` is on)."""
        return self._options.mode

    @nonfinite.setter
    def nonfinite(self, value) -> None:
        self.options = StepOptions(self._options.max_grad_norm, self._options.stats, value,
                                   self._options.history)

    # -- backend ------------------------------------------------------------------------------
    @property
    def backend(self) -> str:
        """The backend that runs the step: ``"triton"`` (CUDA tensors), ``"cpu"`` (the compiled
        CPU executor, ``fastsched._cpu_ext``) or ``"reference"`` (plain PyTorch; ``"auto"`` on
        CPU when the extension is not built or ``FASTSCHED_NO_EXT=1`` is set)."""
        if self._backend_choice != "auto":
            return self._backend_choice
        dev = self._device
        if dev is not None and dev.type == "cuda":
            return "triton"
        return "cpu" if _cpu.available() else "reference"

    @staticmethod
    def _check_choice(value) -> None:
        """A backend that can never run here is refused when it is chosen, not at the first
        step: ``"cpu"`` without the extension (not built, stale, or FASTSCHED_NO_EXT=1)."""
        if value not in BACKENDS:
            raise ValueError(f"backend must be one of {list(BACKENDS)}, got {value!r}")
        if value == "cpu" and not _cpu.available():
            raise ValueError(_cpu.unavailable())

    @backend.setter
    def backend(self, value: str) -> None:
        self._check_choice(value)
        self._backend_choice = value
        self._tables.invalidate()

    def _check_backend(self) -> str:
        b = self.backend
        dev = self._device
        if b == "triton" and dev is not None and dev.type != "cuda" \
                and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before "
                             "triton is imported; use backend='cpu' or 'reference' on CPU")
        if b == "cpu":
            if dev is not None and dev.type != "cpu":
                raise ValueError(f"backend='cpu' runs on CPU tensors, the parameters are on "
                                 f"{dev}; use backend='auto' or 'triton'")
            if not _cpu.available():
                raise ValueError(_cpu.unavailable())
        if b == "reference" and self._backend_choice == "auto":
            _cpu.warn_fallback()
        return b

    @property
    def table_builds(self) -> int:
        """How many times the device tables were built from scratch (a step whose gradients
        moved but whose parameters and states did not only rewrites the gradient column)."""
        return self._tables.rebuilds

    def tables(self) -> dict[str, torch.Tensor]:
        """The raw device buffers of the last step, as the executors wrote them (empty before
        the first step): ``scal`` (per-tensor scalars), ``tstat`` / ``ustat`` (per-tensor
        gradient and update sums), ``gstat`` (global statistics), ``lr``, ``history``,
        ``clock``. Columns are named in ``fastsched.kernels.layout``; every backend writes the
        same layout, so these compare executors directly. Views, not copies; for debugging and
        tests (:attr:`stats` is the decoded form)."""
        plan, buf = self._tables.plan, self._buffers
        if plan is None or buf is None:
            return {}
        return {"scal": plan.scal, "tstat": plan.tstat, "ustat": plan.ustat, "gstat": buf.gstat,
                "lr": buf.lr, "history": buf.history, "clock": buf.clock}

    # -- per-step preparation -----------------------------------------------------------------
    def _step_buffers(self) -> StepBuffers:
        dev = self._device or torch.device("cpu")
        b = self._buffers
        if b is None:
            b = self._buffers = StepBuffers(dev, len(self.param_groups), self._options.history)
        elif b.device != dev:
            b = self._buffers = b.moved(dev, self._options.history)
        return b

    def _follow_device(self) -> None:
        """The model was moved after the optimizer was built (``model.cuda()``): follow it, with
        the backend that device gets, and rebuild every device table there. Only the first
        parameter is looked at here; a partial move is refused when the tables are built."""
        for g in self.param_groups:
            if g["params"]:
                device = local(g["params"][0]).device
                if device != self._device:
                    self._device = device
                    self._tables.invalidate()
                return

    def _flat_params(self) -> list[torch.Tensor]:
        """Every parameter of every group, in order (a C-level chain: about 15 ns a parameter,
        cheaper than checking a cached list element by element)."""
        return list(chain.from_iterable([g["params"] for g in self.param_groups]))

    def _group_sizes(self) -> tuple:
        return tuple(len(g["params"]) for g in self.param_groups)

    def _prepare(self, backend: str):
        """(plan, this step's flat gradient list) or (None, None) when no tensor has one."""
        hx = _hostext.get() if backend != "reference" and not self._mesh else None
        if hx is not None and not _TF_MODE() and type(self.param_groups) is list:
            plan = self._tables.fast(hx, self.param_groups, self.state)
            if plan is not None and plan.backend == backend:
                return plan, None
        flat = self._flat_params()
        key, grads = self._tables.key(flat, self.state, bool(self._mesh), self._group_sizes())
        plan = self._tables.cached(key) or self._tables.repoint(key, grads)
        if plan is not None and plan.backend == backend:
            return plan, grads
        return self._build(flat, grads, backend)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As ``torch.optim.Optimizer.zero_grad``; ``set_to_none=True`` (the default) sets every
        gradient to None in one loop over a cached parameter list (torch's loop checks and
        branches per parameter: 0.26 us a parameter against 0.17 here, 2000 tensors on a
        2-core Xeon)."""
        if not set_to_none:
            return super().zero_grad(False)
        if not hasattr(self, "_zero_grad_profile_name"):
            self._patch_step_function()
        # (not with the reference backend, whose step costs ~25x the compiled one's: a machine
        # without a C++ compiler runs it and would get a second warning, the host helper's)
        hx = _hostext.get() if self.backend != "reference" else None
        if hx is not None and not _TF_MODE() and type(self.param_groups) is list \
                and all(type(g.get("params")) is list for g in self.param_groups):
            if _PROFILING():
                with torch.autograd.profiler.record_function(self._zero_grad_profile_name):
                    hx.zero_grads(self.param_groups)
            else:  # (record_function costs ~3 us even with no profiler to record it)
                hx.zero_grads(self.param_groups)
            return
        with torch.autograd.profiler.record_function(self._zero_grad_profile_name):
            for p in self._flat_params():
                p.grad = None

    def _build(self, flat, grads, backend: str):
        entries, order, copied = [], [], False
        pos = 0
        for gi, group in enumerate(self.param_groups):
            for i, p in enumerate(group["params"]):
                g = grads[pos]
                pos += 1
                if g is None:
                    continue
                self._check_built(f"param_groups[{gi}]['params'][{i}]", p, group)
                if g.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse "
                                       "gradients")
                if g.dtype != p.dtype or g.shape != p.shape:
                    raise RuntimeError(f"gradient of dtype {g.dtype} and shape "
                                       f"{tuple(g.shape)} does not match its parameter "
                                       f"({p.dtype}, {tuple(p.shape)})")
                if g.device != p.device:
                    raise RuntimeError(f"gradient on {g.device} for a parameter on {p.device}")
                if local(g).numel() and not local(g).data_ptr() \
                        and local(g).device.type != "meta":
                    # a wrapper tensor subclass (its data lives in inner tensors): the tables
                    # would hold address 0
                    raise RuntimeError(f"{type(self).__name__} does not support gradients of "
                                       f"type {type(g).__name__} (no storage of their own)")
                if local(g).stride() != local(p).stride():
                    # the kernel walks p, g and the states as one flat array each: a gradient
                    # laid out differently costs one copy (read + write of g) this step
                    g = grads[pos - 1] = torch.empty_like(p).copy_(g)
                    copied = True
                order.append(pos - 1)
                entries.append((p, g, gi))
        if not entries:
            return None, None
        if backend == "triton" and any(p.dtype not in TRITON_DTYPES for p, _, _ in entries):
            # (checked when the tables are built: a backend or device change rebuilds them)
            raise ValueError("backend='triton': float64 parameters are not supported by the "
                             "Triton kernels; use backend='cpu' or 'reference' on CPU tensors")
        devices = {local(p).device for p, _, _ in entries}
        if len(devices) > 1 or devices != {self._device}:
            raise RuntimeError(f"fastsched optimizers need all parameters on one device; they "
                               f"are now on {sorted(map(str, devices))} (moved after the "
                               "optimizer was built?)")
        for p, _, gi in entries:
            self._ensure_state(p, self.param_groups[gi])
        names = dict(zip(map(id, flat), self._names_of(flat)))
        built = [Entry(p, g, gi, self._state_tensors(p, self.param_groups[gi]),
                       self.state[p]["step"], self._unit(self.param_groups[gi]),
                       self._lowp_entry(p, self.param_groups[gi], pos),
                       self._adds_l2(self.param_groups[gi]))
                 for (p, g, gi), pos in zip(entries, order)]
        # the states exist now: the key must see them (a gradient copy is never reused)
        key = None if copied else self._tables.key(flat, self.state, bool(self._mesh),
                                                   self._group_sizes())[0]
        plan = self._tables.build(built, order, key, backend, lambda p: names[id(p)])
        return plan, grads

    def _check_built(self, where: str, p, group) -> None:
        """A parameter changed since its group was added (``p.data`` replaced) is checked again
        before anything of this step is modified: its layout and dtype (_check_param), and that
        each state it has is of its shape. The executors take raw pointers to p and its states
        and walk ``p.numel()`` elements of each: a state of fewer elements would be read and
        written past its end (the reference backend and torch.optim fail on the shapes)."""
        self._check_param(where, p, group.get("allora_eta") is not None)
        state = self.state.get(p)
        if not state:
            return
        for name in self._state_names:
            for key in (name, name + "_code"):
                v = state.get(key)
                if isinstance(v, torch.Tensor) and v.shape != p.shape:
                    raise ValueError(f"{where}: its state {key!r} has shape {tuple(v.shape)}, "
                                     f"the parameter {tuple(p.shape)} (p.data, or the state, "
                                     "replaced by a tensor of another shape?): "
                                     "delete the parameter's state (optimizer.state[p]) to "
                                     "start it again")

    def _ensure_state(self, p, group) -> None:
        state = self.state[p]
        if "step" not in state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        elif not isinstance(state["step"], torch.Tensor) or state["step"].device != p.device \
                or state["step"].dtype != torch.float32:
            state["step"] = torch.as_tensor(state["step"], dtype=torch.float32).to(p.device)
        # states in the group's storage and p's layout (the kernels walk p and its states as
        # flat arrays), the master copy made or dropped (see _precision.py)
        self._convert_states(p, group, state)
        self._init_state(p, group, state)

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
        rows, _ = self._checked_groups()
        plan, grads = self._prepare(backend)
        if plan is None:
            return loss
        buffers = self._step_buffers()
        options = self._options
        run_step(plan, buffers, rows, schedule=self.schedule, options=options,
                 grads=plan.grads_in_order(grads) if backend == "reference" else None,
                 grad_scale=getattr(self, "grad_scale", None),
                 found_inf=getattr(self, "found_inf", None), backend=backend)
        self._ran_stats = options.stats_pass
        self._ran_tensor_stats = options.stats
        return loss

    # -- clock and schedule -------------------------------------------------------------------
    @property
    def clock(self) -> torch.Tensor:
        """The schedule's step counter: a 1-element int64 tensor on the parameters' device."""
        return self._step_buffers().clock

    def set_schedule(self, schedule: Schedule, clock: int | None = None) -> None:
        """Replace the schedule (and optionally the clock) between steps."""
        if not isinstance(schedule, Schedule):
            raise ValueError(f"schedule must be a fastsched.schedules.Schedule, got {schedule!r}")
        if clock is not None and (isinstance(clock, bool) or not isinstance(clock, int)
                                  or clock < 0):
            raise ValueError(f"clock must be an integer >= 0, got {clock!r}")
        self.schedule = schedule
        if clock is not None:
            self.clock.fill_(clock)

    def current_lr(self) -> list[float]:
        """Learning rate of each group at the next step (reads the clock: synchronises)."""
        f = self.schedule(int(self.clock.item()))
        return [float(self._check_lr(g["lr"])) * f for g in self.param_groups]

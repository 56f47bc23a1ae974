"""The table builder: the device tables of a fused step, made from explicit inputs and cached.

A :class:`Plan` holds the tables of one parameter set (one row per tensor with a gradient, rows
sorted into launch buckets); :class:`~._buffers.StepBuffers` holds what outlives a parameter set
(the clock, the group hyperparameters, the statistics and the ring buffer).
:class:`TableBuilder` decides, from one key (:meth:`TableBuilder.key`), whether the cached plan
still describes this step's tensors, patches the gradient column when only gradients moved, and
rebuilds otherwise. Column names come from ``fastsched.kernels.layout``.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

import torch

from ..kernels import layout as L
from . import _distributed, _lowp
from ._distributed import local

__all__ = ["Plan", "Bucket", "Entry", "LowP", "TableBuilder", "allora_units", "h2d",
           "DEFAULT_BLOCK", "RUN_ELEMENTS", "UNIT_CLASSES"]

#: 2048-element blocks with alignment hints: 2.99 TB/s on an H100 (99% of copy); 4096: 2.39 TB/s
DEFAULT_BLOCK = 2048
#: elements of a run, the unit of the pipelined update (kernels/optim.py, _run_update_kernel):
#: 8 blocks of 2048, 16 of 1024, so that a program's steady state (STAGES - 1 = 2-3 blocks
#: copied ahead) covers most of its run, while GPT-2 small (124M parameters) still makes
#: ~7,600 programs, ~10 rounds of the ~790 an H100 holds (132 SMs x 6), for the tail to
#: balance. A multiple of every BLOCK of the table (run starts are aligned to all of them)
RUN_ELEMENTS = 16384
#: ALLoRA tiles (longest unit, units per program, elements per chunk) by unit length: short rows
#: (LoRA B, out x r) would leave most lanes of a 256-wide chunk idle
UNIT_CLASSES = ((16, 128, 16), (128, 16, 128), (None, 8, 256))
#: storage dtypes in launch order (float64: the CPU backends only)
_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_GRAD = operator.attrgetter("grad")
_DATA_PTR = torch.Tensor.data_ptr
_IS_CONTIGUOUS = torch.Tensor.is_contiguous
_STRIDE = torch.Tensor.stride
#: the state column whose presence selects the FLAG variant of the update (amsgrad / momentum)
_FLAG_COL = {L.KIND_ADAM: L.T_S3, L.KIND_SGD: L.T_S1}


def h2d(t: torch.Tensor, device) -> torch.Tensor:
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


@dataclass(frozen=True, eq=False)
class LowP:
    """A tensor's storage below fp32 (see :mod:`._lowp`); absent (None) when the parameter and
    its states share its dtype and it is written with rounding to nearest, as in torch."""

    sdtype: int  # a STATE_* code: the storage of the states
    mode: int = 0  # MODE_* bits
    master: torch.Tensor | None = None  # the float32 master copy (MODE_MASTER)
    scales: tuple = (None, None)  # 8-bit states: the float32 block scales of S1, S2
    key: int = 0  # stochastic rounding: _lowp.sr_key(seed, position)
    elem0: int = 0  # stochastic rounding: index in the whole parameter of the first element

    def tensors(self) -> list:
        return [t for t in (self.master, *self.scales) if t is not None]

    def same(self, other: LowP | None) -> bool:
        """The same storage: equal codes and the very same tensors."""
        return other is not None and (self.sdtype, self.mode, self.key, self.elem0) == (
            other.sdtype, other.mode, other.key, other.elem0) \
            and self.master is other.master \
            and all(a is b for a, b in zip(self.scales, other.scales))


@dataclass(frozen=True)
class Entry:
    """One tensor of a step, as the builder needs it: explicit, nothing read from elsewhere."""

    param: torch.Tensor
    grad: torch.Tensor
    group: int
    states: tuple  # the kind's state tensors in layout order (T_S1, T_S2, T_S3); None: absent
    step: torch.Tensor  # the float32 per-tensor step counter
    unit: str | None  # ALLoRA unit ("row", "column", "tensor") or None
    lowp: LowP | None = None
    #: the group adds weight_decay * p to the gradient (Adam's L2 penalty, SGD's weight decay:
    #: weight_decay != 0, and for Adam not decoupled); otherwise the update leaves the term out,
    #: as torch does (a zero coefficient times an inf parameter would be a NaN in the moments).
    #: Checked against the group rows of each step (functional.run_step: a ValueError)
    l2: bool = False


@dataclass
class Bucket:
    """One launch: the rows ``lo:hi`` of the tensors table, one dtype and one update variant."""

    dtype: torch.dtype
    lo: int
    hi: int
    blocks: torch.Tensor
    n_blocks: int
    aligned: bool
    flag: bool
    static_aligned: bool = True  # the parameter and state addresses (the gradients change)
    units: int = 0  # ALLoRA tile: units per program (0: flat blocks)
    chunk: int = 0
    block_offset: int = 0  # first row of this bucket in the statistics partials
    state: int | None = None  # STATE_* code of the states; None: the parameter's dtype
    mode: int = 0  # MODE_* bits (master copy, stochastic rounding)
    l2: bool = False  # the weight term in the gradient (Entry.l2 of every row)
    #: flat Triton launches: one row (tensor, first element) per run of RUN_ELEMENTS elements,
    #: for the pipelined update where its launch table has the variant (None: ALLoRA tiles)
    runs: torch.Tensor | None = None
    n_runs: int = 0
    #: FLAG buckets: every row has the optional state (amsgrad's max_exp_avg_sq, the momentum
    #: buffer), so the pipelined update can load it outside a branch
    all3: bool = False
    pipelined: bool = False  # the last step launched it pipelined (runs, not blocks)


@dataclass
class Plan:
    """The tables of one parameter set; rows in launch order (by dtype, then ALLoRA class)."""

    kind: int
    backend: str
    device: torch.device
    block: int  # elements per program of the flat launches
    params: list[torch.Tensor]
    group_index: list[int]
    group_rows: torch.Tensor  # group_index on the device (the reference gathers group rows)
    units: list[str | None]
    l2: list[bool]  # per row: Entry.l2
    states: list[tuple]  # per tensor: local state tensors in layout order (None: absent)
    steps: list[torch.Tensor]
    order: list[int]  # order[i]: position in the step's flat gradient list of row i
    numel: list[int]
    numel_dev: torch.Tensor  # float64, on the device (the statistics view divides by it)
    local_params: list[torch.Tensor]
    scal: torch.Tensor  # (n, S_COLS) float32: written by finalize, read by update
    tstat: torch.Tensor  # (n, TS_COLS) float64
    ustat: torch.Tensor  # (n, US_COLS)
    lowp: list = field(default_factory=list)  # per row: LowP or None ([]: none has one)
    # (n, S_COLS) float64: finalize's scalars before rounding, for the float64 update of float64
    # tensors (CPU backends with a float64 parameter only; else None)
    scal64: torch.Tensor | None = None
    dist: Any = None  # the communication plan of DTensor shards (see _distributed.py)
    tensors: torch.Tensor | None = None  # (n, T_COLS) int64: Triton backend only
    host_rows: list[list[int]] = field(default_factory=list)  # T_G: at build time (see gcol)
    gcol: list[int] = field(default_factory=list)  # the gradient addresses now, in row order
    strides: list | None = None  # the parameters' strides in row order; None: all contiguous
    buckets: list[Bucket] = field(default_factory=list)  # update launches
    stat_buckets: list[Bucket] = field(default_factory=list)  # statistics pass (all tensors)
    first_block: torch.Tensor | None = None
    partials: torch.Tensor | None = None
    # the step's launches, recorded for replay (kernels/replay.py; Triton only)
    replay: Any = None
    # the group rows the buckets' l2 flags were last checked against (functional._check_l2)
    l2_rows: Any = None
    # the tensors the tables point at, kept alive: a state replaced behind the optimizer's back
    # must not leave the kernel writing into freed memory (gradients are not kept: see key())
    keep: list[torch.Tensor] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.params)

    def grads_in_order(self, grads: list) -> list[torch.Tensor]:
        """This step's local gradients in row order, from the flat list of :meth:`key`."""
        return [local(grads[i]) for i in self.order]


def _block_table(counts: torch.Tensor, first_index: int, per: int, device) -> torch.Tensor:
    tidx = torch.repeat_interleave(torch.arange(first_index, first_index + len(counts)), counts)
    first = torch.cumsum(counts, 0) - counts
    offs = torch.arange(int(counts.sum())) - torch.repeat_interleave(first, counts)
    table = torch.empty((len(tidx), L.B_COLS), dtype=torch.int64)
    table[:, L.B_TENSOR] = tidx
    table[:, L.B_START] = offs * per
    return h2d(table, device)


_STATE_OF = _lowp.STATE_CODES


def _variant_of(lp: LowP | None, dtype: torch.dtype) -> tuple[int | None, int]:
    """(state code, mode) of an update variant: state None when the states have the
    parameter's dtype (the variants that existed before low precision)."""
    if lp is None:
        return (None, 0)
    return (None if lp.sdtype == _STATE_OF[dtype] else lp.sdtype, lp.mode)


def _same_lowp(a: LowP | None, b: LowP | None) -> bool:
    return b is None if a is None else a.same(b)


def _variant(e: Entry) -> tuple:
    state, mode = _variant_of(e.lowp, e.param.dtype)
    return (-1 if state is None else state, mode)


def _unit_class(ulen: int) -> int:
    return next(k for k, (hi, _, _) in enumerate(UNIT_CLASSES) if hi is None or ulen <= hi)


class TableBuilder:
    """Makes and refreshes the :class:`Plan` of a step; ``rebuilds`` counts full builds."""

    def __init__(self, kind: int, block: int = DEFAULT_BLOCK):
        self.kind = kind
        self.block = block
        self.plan: Plan | None = None
        self.rebuilds = 0
        self._key: tuple | None = None
        # the key of the cached plan as the host helper reads it: (key, parameter and gradient
        # addresses as int64 arrays in flat order, the state dicts and their values) (see fast())
        self._armed: tuple | None = None

    def invalidate(self) -> None:
        """Forget the cached plan (groups, states or devices changed)."""
        self.plan = None
        self._key = None
        self._armed = None

    def armed(self, hx=None, param_groups: list | None = None) -> tuple | None:
        """(key, parameter addresses, gradient addresses, parameter layouts (int64 tensors in
        flat order; gradient 0: none), their data pointers, the state dicts, the objects in
        them in order): the cached key as
        the helper reads it, made from :attr:`_key` when that changed; None when the parameters
        are not laid out as the key says (the Python path decides then)."""
        key, armed = self._key, self._armed
        if armed is None or armed[0] is not key:
            if hx is None:
                return None
            flat = list(chain.from_iterable([g["params"] for g in param_groups]))
            if tuple(map(_STRIDE, flat)) != key[4][0]:
                return None
            pp = torch.tensor(key[1], dtype=torch.int64)
            gp = torch.tensor(key[0], dtype=torch.int64)
            lay = torch.empty(len(key[1]), dtype=torch.int64)
            if not hx.layouts(param_groups, len(key[1]), lay.data_ptr()):
                return None
            armed = self._armed = (key, pp, gp, lay, pp.data_ptr(), gp.data_ptr(),
                                   lay.data_ptr(), list(key[2]), list(key[5]))
        return armed

    def fast(self, hx, param_groups: list, state: dict) -> Plan | None:
        """The cached plan when nothing but (maybe) the gradient addresses changed, checked by
        the host helper ``hx`` (``fastsched/csrc/host.cpp``: ~0.012 us a parameter, against
        ~0.25 us for :meth:`key` + :meth:`cached`); None: take the Python path (:meth:`key`),
        which also decides every case the helper leaves to it (a parameter moved or changed its
        layout or group, a gradient appeared or vanished or is laid out differently, a state
        dict replaced, DTensors)."""
        plan, key = self.plan, self._key
        if plan is None or key is None or key[0] is None or plan.dist is not None:
            return None
        armed = self.armed(hx, param_groups)
        if armed is None:
            return None
        gp, pa, ga, la, states = armed[2], armed[4], armed[5], armed[6], armed[7]
        moved = hx.check(param_groups, len(key[1]), pa, ga, la, state, states, armed[8],
                         key[4][1])
        if moved < 0:
            return None
        if moved:  # new addresses (written into gp): the gradient column, and the key, follow
            gl = gp.tolist()
            self._set_gcol(plan, list(map(gl.__getitem__, plan.order)))
            self._key = (tuple(gl), *key[1:])
            self._armed = (self._key, *armed[1:])
        return plan

    @staticmethod
    def key(params: list, state: dict, dtensors: bool = False,
            sizes: tuple = ()) -> tuple[tuple, list]:
        """The one cache key of a step's tables, and the step's gradients (``p.grad`` of
        ``params``, None where a parameter has none).

        The key is the addresses of every parameter and gradient and the identity and size of
        every per-parameter state dict (a state reset by ``opt.state.clear()`` or
        ``opt.state[p] = {}`` rebuilds, as in torch), and the identity of every object in those
        dicts (a tensor put in place of a state, ``opt.state[p]["exp_avg"] = t``, rebuilds:
        torch.optim reads it at once). Addresses, not gradient objects:
        ``zero_grad(set_to_none=True)`` + ``backward()`` usually hands back gradients at the
        same addresses, and the tables hold addresses only, so those steps reuse the tables and
        the previous gradients are not kept alive.

        Cost: C-level ``map`` chains, about 0.25 us a parameter on a 2-core Xeon (the
        calibration ``[p.grad for p in params]`` takes 0.08 us); a generator doing the same
        costs twice that. The list of state values adds ~0.1 us a parameter of three states
        (2000 parameters on a 2-vCPU AMD EPYC, Zen 3: key() 0.46-0.58 us a parameter, the
        list 0.10-0.13, the calibration 0.08; comparing lazily, without the list, took 1.5x the
        list); the host helper's path (:meth:`fast`) compares the same objects in C. DTensors
        key on their local shards (their own ``data_ptr()`` is 0).
        """
        grads = list(map(_GRAD, params))
        try:
            if dtensors:
                gkey = tuple(0 if g is None else local(g).data_ptr() for g in grads)
                pkey = tuple(local(p).data_ptr() for p in params)
            else:
                pkey = tuple(map(_DATA_PTR, params))
                try:
                    gkey = tuple(map(_DATA_PTR, grads))
                except TypeError:  # some parameter has no gradient this step
                    gkey = tuple(0 if g is None else g.data_ptr() for g in grads)
        except RuntimeError:  # a gradient without storage (sparse): the slow path refuses it
            return (None, None, (), 0, ((), ())), grads
        states = list(state.values())
        # the objects inside them, in order: a state tensor put in place of another
        # (`opt.state[p]["exp_avg"] = t`) rebuilds the tables, as torch would read it at once
        try:
            values = list(chain.from_iterable(map(dict.values, states)))
        except TypeError:  # a state that is not a dict (the build says what is wrong)
            values = list(chain.from_iterable(s.values() for s in states))
        # the parameters' strides (`p.data = p.data.t()` keeps the address) and the size of
        # each group (moving a parameter to another group keeps the flat order)
        layout = (tuple(map(_STRIDE, params)) if not dtensors
                  else tuple(local(p).stride() for p in params), tuple(sizes))
        return (gkey, pkey, states, len(values), layout, values), grads

    def cached(self, key: tuple) -> Plan | None:
        """The cached plan when ``key`` equals the key it was built or patched for."""
        last = self._key
        if self.plan is not None and last is not None and key[0] is not None \
                and key[0] == last[0] and key[1] == last[1] and len(key[2]) == len(last[2]) \
                and all(map(operator.is_, key[2], last[2])) and key[3] == last[3] \
                and key[4] == last[4] and all(map(operator.is_, key[5], last[5])):
            return self.plan
        return None

    def build(self, entries: list[Entry], order: list[int], key: tuple | None, backend: str,
              names_of=None) -> Plan:
        """The plan for ``entries`` (``order[i]``: the flat position of entry ``i``), reusing
        the cached one where only gradient addresses changed. ``key`` None: never reused."""
        plan = self.plan
        if plan is not None and backend == plan.backend and self._same_but_grads(plan, entries,
                                                                                 order):
            self._patch_grads(plan, entries, order)
        else:
            plan = self._build(entries, order, backend, names_of)
            self.rebuilds += 1
        self.plan = plan
        self._key = key
        return plan

    @staticmethod
    def _same_but_grads(plan: Plan, entries: list[Entry], order: list[int]) -> bool:
        if len(plan.params) != len(entries):
            return False
        by_pos = dict(zip(plan.order, range(len(plan.order))))
        for e, pos in zip(entries, order):
            i = by_pos.get(pos)
            if i is None or plan.params[i] is not e.param or plan.group_index[i] != e.group \
                    or plan.units[i] != e.unit or plan.l2[i] != e.l2 \
                    or plan.steps[i] is not e.step \
                    or not _same_lowp(plan.lowp[i] if plan.lowp else None, e.lowp) \
                    or any(a is not (None if b is None else local(b))
                           for a, b in zip(plan.states[i], e.states)):
                return False
            # the addresses the rows hold, not the objects': `p.data = other` keeps the object
            # and moves its storage (the old storage is freed: a stale row would write there)
            r = plan.host_rows[i]
            if r[L.T_P] != local(e.param).data_ptr() or any(
                    r[col] != (0 if s is None else local(s).data_ptr())
                    for col, s in zip(L.T_STATES, e.states)):
                return False
        return True

    def _patch_grads(self, plan: Plan, entries: list[Entry], order: list[int]) -> None:
        """Same parameters and states, gradients at new addresses: rewrite the gradient column
        only (one small host-to-device copy) and re-check the alignment of each launch."""
        g_at = {pos: local(e.grad).data_ptr() for e, pos in zip(entries, order)}
        self._set_gcol(plan, [g_at[pos] for pos in plan.order])

    def _set_gcol(self, plan: Plan, gcol: list[int]) -> None:
        plan.gcol = gcol
        if plan.tensors is None:
            return
        plan.tensors[:, L.T_G].copy_(h2d(torch.tensor(gcol, dtype=torch.int64), plan.device))
        # 16-byte alignment hints: almost always every gradient is aligned (allocators give
        # 64 / 512 bytes); only then is no per-launch check needed
        all_ok = not any(map((15).__and__, gcol))
        for b in plan.buckets + plan.stat_buckets:
            if b.units:
                continue
            b.aligned = b.static_aligned and (all_ok or not any(
                a & 15 for a in gcol[b.lo:b.hi]))

    def repoint(self, key: tuple, grads: list) -> Plan | None:
        """The cached plan for a step whose only change is where the gradients are (new
        gradient objects at new addresses: the gradient column is rewritten), or None.

        torch's ``.grad`` setter already guarantees each gradient's dtype, device and shape;
        what is checked here is what it does not: the strides (the kernels walk a gradient
        with its parameter's layout) and which parameters have a gradient. C-level loops:
        about 0.1 us a tensor.
        """
        plan, last = self.plan, self._key
        if plan is None or last is None or key[0] is None or plan.dist is not None \
                or key[1] != last[1] or key[3] != last[3] or key[4] != last[4] \
                or len(key[2]) != len(last[2]) \
                or not all(map(operator.is_, key[2], last[2])) \
                or not all(map(operator.is_, key[5], last[5])):
            return None
        gk, lk = key[0], last[0]
        if (gk.count(0) or lk.count(0)) and [a == 0 for a in gk] != [a == 0 for a in lk]:
            return None
        mine = list(map(grads.__getitem__, plan.order))
        if plan.strides is None:  # every parameter contiguous
            if not all(map(_IS_CONTIGUOUS, mine)):
                return None
        elif list(map(_STRIDE, mine)) != plan.strides:
            return None
        self._set_gcol(plan, list(map(gk.__getitem__, plan.order)))
        self._key = key
        return plan

    @staticmethod
    def _aligned(rows, cols) -> bool:
        return all(r[c] % 16 == 0 for r in rows for c in cols if r[c])

    def _build(self, entries: list[Entry], order: list[int], backend: str, names_of) -> Plan:
        device = local(entries[0].param).device
        # the kernels and the reference work on local shards (FSDP2 shards dim 0: rows whole)
        info = [allora_units(local(e.param), e.unit) if e.unit is not None else (0, 0, 0, 0)
                for e in entries]
        cls = [_unit_class(ui[0]) if e.unit is not None else -1 for e, ui in zip(entries, info)]
        # buckets: (dtype, update variant) -> one launch each (both are compile-time constants)
        perm = sorted(range(len(entries)),
                      key=lambda i: (_DTYPES.index(entries[i].param.dtype),
                                     _variant(entries[i]), cls[i], entries[i].l2))
        entries = [entries[i] for i in perm]
        info = [info[i] for i in perm]
        cls = [cls[i] for i in perm]
        params = [e.param for e in entries]
        n = len(entries)
        rows = []
        for e, ui in zip(entries, info):
            r = [0] * L.T_COLS
            r[L.T_P] = local(e.param).data_ptr()
            r[L.T_G] = local(e.grad).data_ptr()
            for col, s in zip(L.T_STATES, e.states):
                r[col] = 0 if s is None else local(s).data_ptr()
            r[L.T_STEP] = e.step.data_ptr()
            r[L.T_NUMEL] = local(e.param).numel()
            r[L.T_GROUP] = e.group
            r[L.T_ULEN], r[L.T_USTRIDE], r[L.T_ESTRIDE], r[L.T_NUNITS] = ui
            lp = e.lowp
            r[L.T_SDTYPE] = _STATE_OF[e.param.dtype] if lp is None else lp.sdtype
            if lp is not None:
                r[L.T_MODE] = lp.mode
                r[L.T_MASTER] = 0 if lp.master is None else local(lp.master).data_ptr()
                q1, q2 = lp.scales
                r[L.T_Q1] = 0 if q1 is None else local(q1).data_ptr()
                r[L.T_Q2] = 0 if q2 is None else local(q2).data_ptr()
                r[L.T_SR_KEY], r[L.T_ELEM0] = lp.key, lp.elem0
            rows.append(r)
        units = [e.unit for e in entries]
        plan = Plan(
            kind=self.kind, backend=backend, device=device, block=self.block, params=params,
            group_index=[e.group for e in entries], units=units, l2=[e.l2 for e in entries],
            group_rows=h2d(torch.tensor([e.group for e in entries], dtype=torch.int64), device),
            states=[tuple(None if s is None else local(s) for s in e.states) for e in entries],
            steps=[e.step for e in entries], order=[order[i] for i in perm],
            numel=[p.numel() for p in params],
            numel_dev=h2d(torch.tensor([max(p.numel(), 1) for p in params], dtype=torch.float64),
                          device),
            local_params=[local(p) for p in params],
            scal=torch.zeros((n, L.S_COLS), dtype=torch.float32, device=device),
            tstat=torch.zeros((n, L.TS_COLS), dtype=torch.float64, device=device),
            # float atomics of the update pass in fp32; the reference sums in float64
            ustat=torch.zeros((n, L.US_COLS), device=device,
                              dtype=torch.float32 if backend == "triton" else torch.float64),
            dist=_distributed.dist_plan(params, units, device), host_rows=rows,
            gcol=[r[L.T_G] for r in rows],
            strides=None if all(map(_IS_CONTIGUOUS, params)) else [p.stride() for p in params],
            lowp=[e.lowp for e in entries] if any(e.lowp for e in entries) else [],
            scal64=torch.zeros((n, L.S_COLS), dtype=torch.float64, device=device)
            if backend != "triton" and any(p.dtype == torch.float64 for p in params) else None,
            keep=[t for e in entries for t in (e.step, *e.states,
                                               *(e.lowp.tensors() if e.lowp else ()))
                  if t is not None])
        if backend == "reference":
            return plan
        plan.tensors = h2d(torch.tensor(rows, dtype=torch.int64), device)
        if backend != "triton":  # the compiled CPU executor walks the tensors table itself
            return plan
        if plan.dist is not None and names_of is not None:
            _distributed.check_units(params, units, names_of)
        flat = (torch.tensor([r[L.T_NUMEL] for r in rows], dtype=torch.int64)
                + self.block - 1) // self.block
        self._update_buckets(plan, rows, cls, info, flat)
        first = torch.zeros(n + 1, dtype=torch.int64)
        first[1:] = torch.cumsum(flat, 0)
        plan.first_block = h2d(first, device)
        plan.partials = torch.zeros((max(int(first[-1]), 1), L.PART_COLS),
                                    dtype=torch.float32, device=device)
        for lo, hi in self._runs([p.dtype for p in params]):
            blocks = _block_table(flat[lo:hi], lo, self.block, device)
            aligned = all(r[L.T_G] % 16 == 0 for r in rows[lo:hi])
            plan.stat_buckets.append(Bucket(params[lo].dtype, lo, hi, blocks, blocks.shape[0],
                                            aligned, False, block_offset=int(first[lo])))
        return plan

    @staticmethod
    def _runs(keys):
        lo, n = 0, len(keys)
        while lo < n:
            hi = lo
            while hi < n and keys[hi] == keys[lo]:
                hi += 1
            yield lo, hi
            lo = hi

    def _update_buckets(self, plan: Plan, rows, cls, info, flat) -> None:
        keys = [(p.dtype, _variant_of(lp, p.dtype), c, l2)
                for p, c, lp, l2 in zip(plan.params, cls, plan.lowp or [None] * len(cls),
                                        plan.l2)]
        for lo, hi in self._runs(keys):
            dtype, (state, mode), c, l2 = keys[lo]
            has = [r[_FLAG_COL[self.kind]] != 0 for r in rows[lo:hi]]
            flag = any(has)
            if c < 0:
                blocks = _block_table(flat[lo:hi], lo, self.block, plan.device)
                counts = torch.tensor([-(-r[L.T_NUMEL] // RUN_ELEMENTS) for r in rows[lo:hi]],
                                      dtype=torch.int64)
                runs = _block_table(counts, lo, RUN_ELEMENTS, plan.device)
                static = self._aligned(rows[lo:hi], (L.T_P,) + L.T_STATES)
                plan.buckets.append(Bucket(dtype, lo, hi, blocks, blocks.shape[0],
                                           static and self._aligned(rows[lo:hi], (L.T_G,)),
                                           flag, static_aligned=static, state=state,
                                           mode=mode, l2=l2, runs=runs, n_runs=runs.shape[0],
                                           all3=all(has)))
            else:
                _, nu, chunk = UNIT_CLASSES[c]
                tiles = torch.tensor([(ui[3] + nu - 1) // nu for ui in info[lo:hi]],
                                     dtype=torch.int64)
                blocks = _block_table(tiles, lo, nu, plan.device)
                plan.buckets.append(Bucket(dtype, lo, hi, blocks, blocks.shape[0], False, flag,
                                           units=nu, chunk=chunk, state=state, mode=mode,
                                           l2=l2))

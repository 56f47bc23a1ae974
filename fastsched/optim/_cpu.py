"""The compiled CPU executor: loads ``fastsched._cpu_ext`` and runs a step's passes with it.

The extension (C++ with OpenMP, sources in ``setup_ext/``) executes the passes of
:mod:`._reference` on the same tables (``plan.tensors`` addresses, ``plan.scal``, ``tstat``,
``ustat`` and the :class:`~._buffers.StepBuffers`): statistics, finalize (schedule, clip
coefficient, skip flag, per-tensor scalars in float64), update (Adam / AdamW / SGD, ALLoRA units;
below fp32: master weights, stochastic rounding, states stored as float32 / bfloat16 / 8-bit
codes, bit for bit as :mod:`._lowp` and the reference), with fixed-size blocks whose partial
sums are combined in block order, so results do not depend on the thread count
(``torch.get_num_threads()``, read at every step).

It is built by ``pip install -e .`` when a C++ compiler with OpenMP is there; without it
:func:`available` is False, :func:`reason` says why, and ``backend="auto"`` falls back to the
reference backend with one warning (:func:`warn_fallback`). ``FASTSCHED_NO_EXT=1`` turns it off.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import warnings

import torch

from ..kernels import layout as L
from . import _lowp

__all__ = ["available", "reason", "warn_fallback", "run_step", "DTYPE_CODES", "ext",
           "SUPPORTS_LOWP"]

#: storage dtype codes of the extension (its ``dtype_codes()`` must agree)
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.float64: 3}
#: the extension runs the options below fp32 (``plan.lowp``: master weights, stochastic
#: rounding, states stored as float32 / bfloat16 / float16 / float64 / 8-bit codes, read from
#: the tensors table's T_SDTYPE / T_MODE columns); a build without them is refused at load
SUPPORTS_LOWP = True
_API = ("layout", "dtype_codes", "block", "grad_stats", "finalize", "unit_sums", "update",
        "stream", "quantize", "dequantize", "sr_round", "q_top", "div_by")
_STATE_CODES = _lowp.STATE_CODES
HOW = ("install a C++ compiler with OpenMP (e.g. `apt-get install g++`) and reinstall with "
       "`pip install -e .`")

_ext = None
_reason: str | None = None
_warned = False
_NO_RANGE = contextlib.nullcontext()
#: names of the profiler ranges of the passes (``fastsched profile`` counts them as the CPU
#: "kernels": the extension runs no aten operators the profiler could see)
PASS_RANGES = {p: f"fastsched::{p}" for p in ("grad_stats", "finalize", "unit_sums", "update")}


def _layout_constants() -> dict[str, int]:
    return {k: v for k, v in vars(L).items()
            if k.isupper() and isinstance(v, int) and not isinstance(v, bool)}


def _load():
    """The extension module, or None with ``_reason`` set."""
    global _ext, _reason
    if _ext is not None or _reason is not None:
        return _ext
    if os.environ.get("FASTSCHED_NO_EXT") == "1":
        _reason = "it is turned off by FASTSCHED_NO_EXT=1"
        return None
    try:
        from .. import _cpu_ext as ext
    except ImportError as e:
        _reason = f"the extension fastsched._cpu_ext was not built ({e})"
        return None
    missing = [f for f in _API if not hasattr(ext, f)]
    if missing:
        _reason = f"fastsched._cpu_ext is an old build without {missing}; rebuild it"
        return None
    # the C++ constants are generated from layout.py at build time: a build older than an
    # edit of layout.py would read the wrong columns
    built, now = ext.layout(), _layout_constants()
    if built != now:
        diff = sorted(k for k in set(built) | set(now) if built.get(k) != now.get(k))
        _reason = (f"fastsched._cpu_ext was built from another kernels/layout.py (differs in "
                   f"{diff[:5]}); rebuild it with `pip install -e .`")
        return None
    if ext.q_top() != L.Q_TOP:  # a float: not among the generated constants
        _reason = (f"fastsched._cpu_ext was built with Q_TOP {ext.q_top()}, kernels/layout.py "
                   f"has {L.Q_TOP}; update setup_ext/kernels.h and rebuild")
        return None
    codes = {getattr(torch, k): v for k, v in ext.dtype_codes().items()}
    if codes != DTYPE_CODES:
        _reason = f"fastsched._cpu_ext has dtype codes {codes}, expected {DTYPE_CODES}"
        return None
    _ext = ext
    return ext


def available() -> bool:
    """Whether the compiled CPU executor can run (built, current, not turned off)."""
    return _load() is not None


def reason() -> str:
    """Why the compiled CPU executor is not available ('' when it is)."""
    _load()
    return _reason or ""


def warn_fallback() -> None:
    """Warn once per process that CPU steps run on the slower reference backend (not when the
    extension was turned off on purpose with FASTSCHED_NO_EXT=1)."""
    global _warned
    if _warned or available() or os.environ.get("FASTSCHED_NO_EXT") == "1":
        return
    _warned = True
    warnings.warn(f"fastsched: the compiled CPU backend is not available: {reason()}. CPU steps "
                  f"run on the PyTorch reference backend (about 25x slower); to get the compiled "
                  f"one, {HOW}. Set FASTSCHED_NO_EXT=1 to silence this.", RuntimeWarning,
                  stacklevel=caller_level())


#: the directories of fastsched's and torch's sources
_INSIDE = (os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep,
           os.path.dirname(os.path.abspath(torch.__file__)) + os.sep)


def caller_level() -> int:
    """``stacklevel`` for a warning raised under ``step()`` that names the user's line: the
    first frame outside fastsched and torch (step is wrapped by torch.no_grad and by
    torch.optim's profiling hook, so the depth is not fixed: 6 frames on torch 2.13)."""
    f, level = sys._getframe(1), 1
    while f is not None and f.f_code.co_filename.startswith(_INSIDE):
        f, level = f.f_back, level + 1
    return level


def unavailable() -> str:
    """Why ``backend='cpu'`` cannot run and what to do about it ('' when it can)."""
    if _load() is not None:
        return ""
    fix = ("unset FASTSCHED_NO_EXT" if os.environ.get("FASTSCHED_NO_EXT") == "1" else HOW)
    return f"backend='cpu' is not available: {_reason}; {fix}, or use backend='reference'"


def ext():
    """The extension module (ValueError when it is not available)."""
    m = _load()
    if m is None:
        raise ValueError(unavailable())
    return m


def _check_lowp(plan) -> None:
    """The storage each row's T_SDTYPE / T_MODE promise, against the tensors the plan holds:
    the extension reads raw addresses, so a disagreement would read or write wrong memory."""
    for i, p in enumerate(plan.params):
        lp = plan.lowp[i] if plan.lowp else None
        row = plan.host_rows[i]
        states = [t for t in plan.states[i] if t is not None]
        where = f"backend='cpu': parameter {i} (shape {tuple(p.shape)}, {p.dtype})"
        codes = {_STATE_CODES.get(t.dtype) for t in states}
        if len(codes) > 1 or None in codes:
            raise ValueError(f"{where}: states of dtypes {[t.dtype for t in states]}: the "
                             "compiled executor needs one storage per tensor")
        if states and codes != {row[L.T_SDTYPE]}:
            raise ValueError(f"{where}: the table says states stored as code "
                             f"{row[L.T_SDTYPE]}, they are {states[0].dtype}")
        if lp is None:
            if row[L.T_MODE]:
                raise ValueError(f"{where}: T_MODE {row[L.T_MODE]} without low-precision "
                                 "options")
            continue
        if lp.mode & L.MODE_SR and (p.dtype != torch.bfloat16 or lp.master is not None):
            raise ValueError(f"{where}: stochastic rounding needs bfloat16 parameters without "
                             "a master copy")
        if lp.master is not None:
            m = lp.master
            if m.dtype != torch.float32 or m.numel() != plan.local_params[i].numel() \
                    or m.stride() != plan.local_params[i].stride():
                raise ValueError(f"{where}: the master copy must be float32 laid out like the "
                                 f"parameter (got {m.dtype}, strides {m.stride()})")
        if lp.sdtype == L.STATE_8BIT:
            if plan.states[i][2] is not None:
                raise ValueError(f"{where}: 8-bit states with amsgrad are not supported")
            for k, t in enumerate(plan.states[i][:2]):
                q = lp.scales[k]
                if t is not None and (q is None or q.dtype != torch.float32
                                      or q.numel() < -(-t.numel() // L.Q_BLOCK)
                                      or not q.is_contiguous()):
                    raise ValueError(f"{where}: 8-bit state {k} needs contiguous float32 "
                                     f"scales, one per {L.Q_BLOCK} elements")


class _Meta:
    """What the extension needs besides the tables, per plan (params and units fixed)."""

    def __init__(self, plan):
        n = len(plan)
        _check_lowp(plan)
        self.dtypes = torch.tensor([DTYPE_CODES[p.dtype] for p in plan.params],
                                   dtype=torch.int64)
        uoff, total = [], 0
        for i, unit in enumerate(plan.units):
            if unit is None:
                uoff.append(-1)
            else:
                uoff.append(total)
                total += plan.host_rows[i][L.T_NUNITS]
        self.uoff = torch.tensor(uoff if n else [0], dtype=torch.int64)
        self.usums = torch.zeros(max(total, 1), dtype=torch.float64)
        self.allora = total > 0
        # (row, offset, local units, units the reference all-reduces: an empty shard still
        # takes part in the collective with the unit count of its shape)
        self.unit_ranges = [(i, o, plan.host_rows[i][L.T_NUNITS],
                             _reduced_units(plan.local_params[i], plan.units[i]))
                            for i, o in enumerate(uoff) if o >= 0]
        # ALLoRA units spanning ranks: norms summed over ranks, as the reference does
        self.span = plan.dist is not None and any(
            g is not None for g in plan.dist.unit_groups)
        self.rows3 = [L.TS_SQ, L.TS_ABS, L.TS_NONFINITE]


def _reduced_units(p: torch.Tensor, unit: str) -> int:
    if p.dim() < 2 or unit == "tensor":
        return 1
    return p.shape[0] if unit == "row" else math.prod(p.shape[1:])


def _meta(plan) -> _Meta:
    m = getattr(plan, "_cpu_meta", None)
    if m is None:
        m = plan._cpu_meta = _Meta(plan)
    return m


def _addr(t) -> int:
    return 0 if t is None else t.data_ptr()


def _f32(t):
    if t is None:
        return None
    if t.dtype != torch.float32 or not t.is_contiguous() or t.device.type != "cpu":
        t = t.to(device="cpu", dtype=torch.float32).contiguous()
    return t


def _ranges(on: bool):
    """Profiler range per pass when a profiler records (else one shared no-op context)."""
    if not on:
        return lambda name: _NO_RANGE
    return lambda name: torch.autograd.profiler.record_function(PASS_RANGES[name])


def run_step(plan, buffers, rows: tuple, table: torch.Tensor, options, gs, fi) -> None:
    """The passes of one step with the compiled executor (see :func:`.functional.run_step`).

    Under a profiler each pass is a ``fastsched::<pass>`` range (:data:`PASS_RANGES`); without
    one, the step creates no profiler objects.
    """
    x = ext()
    rng = _ranges(torch.autograd._profiler_enabled())
    if plan.device.type != "cpu":
        raise ValueError(f"backend='cpu' needs CPU tensors, the parameters are on {plan.device}")
    meta = _meta(plan)
    nt = torch.get_num_threads()
    n = len(plan)
    tensors = plan.tensors.data_ptr()
    if options.stats_pass:
        with rng("grad_stats"):
            x.grad_stats(tensors, meta.dtypes.data_ptr(), n, plan.tstat.data_ptr(),
                         int(options.guard), nt)
        if plan.dist is not None:  # global per-tensor sums (one all-reduce), as the reference
            sums = plan.tstat[:, meta.rows3]
            sums = plan.dist.reduce_rows(sums)
            plan.tstat[:, meta.rows3] = sums
    if not table.is_contiguous() or table.dtype != torch.float64:
        table = table.to(torch.float64).contiguous()
    gs, fi = _f32(gs), _f32(fi)
    groups = buffers.groups
    with rng("finalize"):
        x.finalize(plan.kind, tensors, n, groups.data_ptr(), groups.shape[0],
                   plan.scal.data_ptr(), _addr(plan.scal64), table.data_ptr(), table.shape[0],
                   buffers.clock.data_ptr(), buffers.config.data_ptr(), plan.tstat.data_ptr(),
                   buffers.gstat.data_ptr(), buffers.lr.data_ptr(), buffers.history.data_ptr(),
                   buffers.history_pos.data_ptr(), buffers.history_len, _addr(gs), _addr(fi),
                   int(options.stats_pass), int(options.max_grad_norm is not None),
                   int(options.guard))
    ready = 0
    if meta.span:
        # unit norms of the local shards, summed over the ranks that hold parts of a unit
        with rng("unit_sums"):
            x.unit_sums(tensors, meta.dtypes.data_ptr(), n, meta.uoff.data_ptr(),
                        meta.usums.data_ptr(), nt)
        for i, o, k, kr in meta.unit_ranges:
            s = meta.usums[o:o + k].clone() if k == kr else torch.zeros(kr, dtype=torch.float64)
            s = plan.dist.reduce_units(i, s)
            if k:
                meta.usums[o:o + k] = s
        ready = 1
    # (ALLoRA unit sums not summed over ranks are computed inside the update call)
    with rng("update"):
        x.update(plan.kind, tensors, meta.dtypes.data_ptr(), n, plan.scal.data_ptr(),
                 _addr(plan.scal64), plan.ustat.data_ptr(), meta.uoff.data_ptr(),
                 meta.usums.data_ptr(), ready, int(options.stats), nt)
    if plan.dist is not None and options.stats:  # whole-tensor norms
        plan.dist.reduce_rows(plan.ustat)

"""Compile every Triton kernel for a GPU target without a GPU (front end to PTX/cubin).

Catches what the interpreter never sees (non-constexpr globals, type errors in compiled
control flow, unsupported ops), e.g. ``python bench/compile_check.py --arch 90``. Run without
``TRITON_INTERPRET``.

The signatures are not typed by hand: :func:`variants` runs the optimizers' real host path
(``TableBuilder`` -> ``functional.adam`` / ``sgd`` -> the launchers, and ``evaluate_schedule``)
on CPU tensors for every configuration of :func:`configs`, with each kernel's ``run`` replaced by
a recorder, and types each recorded launch from its arguments. A launcher that passes another
argument, dtype or constexpr changes what is compiled here without an edit to this file.
Importable without compiling (``tests/kernels/test_compile.py`` checks the coverage in process).
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import itertools
import math
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field

import torch
import triton
from fastsched.kernels import layout as L
from fastsched.kernels import optim as ko
from fastsched.kernels import schedule as ks
from triton.runtime.jit import KernelInterface

from fastsched.optim import _lowp, functional
from fastsched.optim._buffers import StepBuffers
from fastsched.optim._tables import DEFAULT_BLOCK, UNIT_CLASSES, Entry, LowP, TableBuilder
from fastsched.optim.functional import StepOptions
from fastsched.schedules import Constant, Cosine

KINDS = (L.KIND_ADAM, L.KIND_SGD)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ALLORA_UNITS = (None, "row", "column", "tensor")  # None: a step without ALLoRA tensors
#: evaluate_schedule's block on a GPU (the CPU default follows the step count instead)
SCHEDULE_BLOCK = 256

#: pointer element types of the tensors a launcher may pass
_PTR_TYPES = {torch.float32: "fp32", torch.float64: "fp64", torch.float16: "fp16",
              torch.bfloat16: "bf16", torch.int64: "i64", torch.int32: "i32",
              torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8", torch.bool: "i1"}


@dataclass(frozen=True)
class Config:
    """One optimizer step as the host path sees it (what decides which variants launch)."""

    kind: int
    dtype: torch.dtype
    aligned: bool  # False: parameter and gradient are views at an odd storage offset
    #: amsgrad (Adam) / momentum (SGD): the optional state exists; "mixed": for one flat
    #: tensor only (groups with and without momentum in one launch: the per-block kernel, where
    #: a launch whose every tensor has it may run pipelined)
    flag: bool | str
    options: StepOptions
    scaler: bool  # GradScaler's grad_scale / found_inf handed to the step
    unit: str | None  # ALLoRA unit of the extra tensors (one per unit class); None: none
    #: below fp32: (STATE_* code of the states, MODE_* bits); None: as torch (the states in the
    #: parameter's dtype, rounding to nearest)
    lowp: tuple | None = None
    #: the groups add weight_decay * p to the gradient (Adam's L2 penalty, SGD's weight decay)
    l2: bool = False

    def __str__(self) -> str:
        o = self.options
        lp = "" if self.lowp is None else f" state={self.lowp[0]} mode={self.lowp[1]}"
        return (f"{'adam' if self.kind == L.KIND_ADAM else 'sgd'} {str(self.dtype)[6:]} "
                f"aligned={self.aligned} flag={self.flag} max_grad_norm={o.max_grad_norm} "
                f"stats={o.stats} nonfinite={o.mode} history={o.history} "
                f"scaler={self.scaler} allora={self.unit} l2={self.l2}{lp}")


@dataclass
class Variant:
    """One compiled specialisation: a kernel, the types of its runtime arguments and the values
    of its constexprs, as a launch made them."""

    fn: KernelInterface
    signature: dict  # runtime argument -> Triton type ("*fp32", "i32", ...)
    constexprs: dict  # constexpr argument -> value (tl dtypes as given)
    options: dict = field(default_factory=dict)  # launch options (num_warps, ...) if any
    source: str = ""  # the first configuration that launched it

    @property
    def name(self) -> str:
        return kernel_name(self.fn)

    @property
    def key(self) -> tuple:
        return (self.name, tuple(self.signature.items()),
                tuple((k, str(v)) for k, v in self.constexprs.items()),
                tuple(sorted((k, str(v)) for k, v in self.options.items())))


def kernel_name(fn) -> str:
    return getattr(fn, "__name__", None) or fn.fn.__name__


def kernels() -> list:
    """Every ``@triton.jit`` kernel (name ending in ``_kernel``) of the optimizer and schedule
    modules: what a launch may reach, compiled or interpreted."""
    return [v for m in (ko, ks) for k, v in vars(m).items()
            if k.endswith("_kernel") and isinstance(v, KernelInterface)]


#: the optional state: on every tensor, on none, on some (Config.flag)
FLAGS = (True, False, "mixed")


def configs() -> list[Config]:
    """Every combination of what the host path branches on: 2 kinds x 3 dtypes x aligned x flag
    (:data:`FLAGS`) x 16 option sets x scaler x 4 ALLoRA settings x the weight term = 9,216
    steps, ~8 s of host work (the variants they launch are deduplicated; --quick picks among
    them too)."""
    opts = [StepOptions(max_grad_norm=m, stats=s, nonfinite=nf, history=h)
            for m, s, nf, h in itertools.product((None, 1.0), (False, True), ("skip", "ignore"),
                                                 (0, 4))]
    return [Config(*c[:-1], l2=c[-1])
            for c in itertools.product(KINDS, DTYPES, (True, False), FLAGS, opts,
                                       (True, False), ALLORA_UNITS, (False, True))]


#: the variants below fp32: (parameter dtype, STATE_* code of the states, MODE_* bits)
LOWP = ((torch.bfloat16, L.STATE_F32, L.MODE_MASTER),  # bf16 params + fp32 master and states
        (torch.float16, L.STATE_F32, L.MODE_MASTER),
        (torch.bfloat16, L.STATE_BF16, L.MODE_MASTER),
        (torch.bfloat16, L.STATE_BF16, L.MODE_SR),  # the states in the parameter's dtype
        (torch.bfloat16, L.STATE_F32, 0),
        (torch.float32, L.STATE_BF16, 0),
        (torch.float32, L.STATE_8BIT, 0),
        (torch.bfloat16, L.STATE_8BIT, 0),
        (torch.bfloat16, L.STATE_8BIT, L.MODE_SR),
        (torch.bfloat16, L.STATE_8BIT, L.MODE_MASTER))


def lowp_configs() -> list[Config]:
    """The steps below fp32 (:data:`LOWP`) x kinds x aligned x flag x stats x ALLoRA settings
    x the weight term;
    8-bit states neither with amsgrad (refused by the host) nor in ALLoRA unit tiles (refused
    by the launcher). Kept apart from :func:`configs`: the variants of the torch semantics stay
    what they were (``tests/kernels/test_compile.py`` counts them)."""
    opts = (StepOptions(), StepOptions(stats=True))
    out = []
    for (dtype, state, mode), kind, aligned, flag, o, unit, l2 in itertools.product(
            LOWP, KINDS, (True, False), FLAGS, opts, ALLORA_UNITS, (False, True)):
        if state == L.STATE_8BIT and (unit is not None or (kind == L.KIND_ADAM and flag)):
            continue
        out.append(Config(kind, dtype, aligned, flag, o, False, unit, (state, mode), l2))
    return out


_STATE_DTYPES = {L.STATE_F32: torch.float32, L.STATE_BF16: torch.bfloat16,
                 L.STATE_F16: torch.float16, L.STATE_8BIT: torch.uint8}


# ALLoRA shapes whose unit length falls in each class of UNIT_CLASSES (<= 16, <= 128, longer):
# row: unit = a row (shape[1]); column: a column (shape[0]); tensor: the whole tensor
_ALLORA_SHAPES = {"row": ((4, 8), (4, 100), (2, 300)), "column": ((8, 4), (100, 4), (300, 2)),
                  "tensor": ((2, 4), (4, 25), (10, 30))}


def _tensor(shape, dtype, aligned: bool) -> torch.Tensor:
    if aligned:  # torch's CPU allocations are 64-byte aligned
        return torch.zeros(shape, dtype=dtype)
    # one element in: 4 (fp32) or 2 (bf16, fp16) bytes past a 16-byte boundary, still dense
    return torch.zeros(math.prod(shape) + 1, dtype=dtype)[1:].view(shape)


def _entries(cfg: Config) -> list[Entry]:
    # flat tensors: 3000 elements (two 2048-element blocks, the second partial) and a matrix
    specs = [((3000,), None), ((33, 65), None)]
    if cfg.unit is not None:
        specs += [(s, cfg.unit) for s in _ALLORA_SHAPES[cfg.unit]]
    out = []
    for shape, unit in specs:
        flag = bool(cfg.flag) and not (cfg.flag == "mixed" and shape == (33, 65))
        p = _tensor(shape, cfg.dtype, cfg.aligned)
        g = _tensor(shape, cfg.dtype, cfg.aligned)
        # states as _init_state makes them: fresh allocations, so aligned whatever p is
        sd = p.dtype if cfg.lowp is None else _STATE_DTYPES[cfg.lowp[0]]
        if cfg.kind == L.KIND_ADAM:
            states = (torch.zeros_like(p, dtype=sd), torch.zeros_like(p, dtype=sd),
                      torch.zeros_like(p, dtype=sd) if flag else None)
        else:
            states = (torch.zeros_like(p, dtype=sd) if flag else None, None, None)
        lowp = None
        if cfg.lowp is not None:
            state, mode = cfg.lowp
            master = torch.zeros(shape) if mode & L.MODE_MASTER else None
            scales = (None, None)
            if state == L.STATE_8BIT:
                scales = tuple(None if s is None else torch.zeros(_lowp.n_blocks(p.numel()))
                               for s in states[:2])
            lowp = LowP(state, mode, master, scales, _lowp.sr_key(0, len(out)), 0)
        out.append(Entry(p, g, 0, states, torch.zeros((), dtype=torch.float32), unit, lowp,
                         cfg.l2))
    return out


def _check_classes(plan, cfg: Config) -> None:
    """The shapes above must land in every unit class, or a units variant goes unchecked."""
    got = sorted(b.units for b in plan.buckets if b.units)
    want = sorted(nu for _, nu, _ in UNIT_CLASSES) if cfg.unit is not None else []
    if got != want:
        raise AssertionError(f"ALLoRA buckets with {got} units per program, expected {want}")


def run_config(cfg: Config) -> None:
    """One step of ``cfg`` through the real host path (kernels must be recording)."""
    entries = _entries(cfg)
    plan = TableBuilder(cfg.kind, DEFAULT_BLOCK).build(entries, list(range(len(entries))),
                                                       key=None, backend="triton")
    _check_classes(plan, cfg)
    buffers = StepBuffers("cpu", 1, cfg.options.history)
    scaler = {}
    if cfg.scaler:  # torch.amp.GradScaler's float32 one-element tensors
        scaler = {"grad_scale": torch.full((1,), 1024.0), "found_inf": torch.zeros(1)}
    # the optimizers' default schedule (FusedOptimizer: Constant(1.0) when none is given)
    common = dict(lr=1e-3, schedule=Constant(1.0), options=cfg.options, backend="triton",
                  allora_eta=None if cfg.unit is None else 1.0,
                  weight_decay=0.01 if cfg.l2 else 0.0, **scaler)
    if cfg.kind == L.KIND_ADAM:
        functional.adam(plan, buffers, amsgrad=bool(cfg.flag), **common)
    else:
        functional.sgd(plan, buffers, momentum=0.9 if cfg.flag else 0.0, **common)


def _scalar_type(v) -> str:
    if isinstance(v, bool):
        return "i1"
    if isinstance(v, int):
        return "i32" if -2**31 <= v < 2**31 else "i64"
    if isinstance(v, float):
        return "fp32"
    raise TypeError(f"no Triton type for {type(v).__name__} {v!r}")


_SIGNATURES: dict = {}


def _signature(fn) -> inspect.Signature:
    if fn not in _SIGNATURES:  # inspect.signature: 0.15 ms, and up to 6 launches a step
        _SIGNATURES[fn] = inspect.signature(fn.fn)
    return _SIGNATURES[fn]


def _is_constexpr(fn, i: int, name: str) -> bool:
    params = getattr(fn, "params", None)  # JITFunction; the interpreter's function has none
    if params is not None:
        return params[i].is_constexpr
    # the annotation is a string under `from __future__ import annotations`
    return "constexpr" in str(_signature(fn).parameters[name].annotation)


def _variant(fn, args, kwargs, source: str) -> Variant:
    """The variant a launch ``fn[grid](*args, **kwargs)`` compiles: arguments bound to the
    kernel's parameters (defaults applied); other keywords are launch options."""
    names = list(fn.arg_names)
    opts = {k: v for k, v in kwargs.items() if k not in names}
    bound = _signature(fn).bind(*args, **{k: v for k, v in kwargs.items() if k in names})
    bound.apply_defaults()
    sig, cex = {}, {}
    for i, n in enumerate(names):
        v = bound.arguments[n]
        if _is_constexpr(fn, i, n):
            cex[n] = v
        elif isinstance(v, torch.Tensor):
            try:
                sig[n] = "*" + _PTR_TYPES[v.dtype]
            except KeyError:
                raise TypeError(f"{kernel_name(fn)}({n}=...): no Triton pointer type for "
                                f"{v.dtype}") from None
        else:
            try:
                sig[n] = _scalar_type(v)
            except TypeError as e:
                raise TypeError(f"{kernel_name(fn)}({n}=...): {e}") from None
    return Variant(fn, sig, cex, opts, source)


@contextlib.contextmanager
def _one_thread():
    # the tables are a few rows: with torch's intra-op pool (2 threads) one repeat_interleave
    # took 4 ms against 10 us on one thread: 55 s against 2.5 s for the 3,072 steps
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@contextlib.contextmanager
def recording(sink: list, source: list):
    """Replace ``run`` of every kernel by a recorder (``fn[grid](...)`` calls ``fn.run``, in
    compiled and interpreted Triton alike); ``source[0]`` labels the launches."""
    fns = kernels()
    saved = [vars(f).get("run") for f in fns]

    def recorder(fn):
        def run(*args, grid, warmup, **kwargs):
            sink.append(_variant(fn, args, kwargs, source[0]))
        return run

    try:
        for f in fns:
            f.run = recorder(f)
        yield
    finally:
        for f, old in zip(fns, saved):
            if old is None:
                vars(f).pop("run", None)
            else:
                f.run = old


def variants(lowp: bool = False) -> tuple[list[Variant], int]:
    """(the distinct variants in first-launch order, how many configurations launched them);
    ``lowp``: the steps of :func:`lowp_configs` too (after the others).

    Raises on the first configuration whose host path fails, naming it."""
    launched: list[Variant] = []
    source = [""]
    cfgs = configs() + (lowp_configs() if lowp else [])
    with _one_thread(), recording(launched, source):
        for cfg in cfgs:
            source[0] = str(cfg)
            try:
                run_config(cfg)
            except Exception as e:
                raise RuntimeError(f"step {cfg}: {type(e).__name__}: {e}") from e
        source[0] = f"evaluate_schedule(block={SCHEDULE_BLOCK})"
        # as the schedule tests call it, with the block a CUDA tensor gets: warmup + cosine
        table = Cosine(1000, warmup_steps=100).table("cpu")
        ks.evaluate_schedule(table, torch.arange(1000), block=SCHEDULE_BLOCK)
    seen: dict = {}
    for v in launched:
        seen.setdefault(v.key, v)
    return list(seen.values()), len(cfgs) + 1


def _features(v: Variant) -> tuple:
    # most flags on; then bf16 storage, the only dtype that takes _to_storage's rounding by bit
    # arithmetic; ties keep the first launched (Adam before SGD)
    # (below fp32: 8-bit states, then the highest MODE, i.e. stochastic rounding)
    c = v.constexprs
    flags = sum(1 for x in c.values() if x is True)
    return (flags, str(c.get("SDTYPE")) == "uint8", c.get("MODE", 0), str(c.get("DTYPE")) == "bf16")


def pick_quick(vs: list[Variant]) -> list[Variant]:
    """One variant per kernel: the one with the most features on."""
    best: dict = {}
    for v in vs:
        if v.name not in best or _features(v) > _features(best[v.name]):
            best[v.name] = v
    return list(best.values())


def compile_variant(v: Variant, target):
    from triton.compiler import ASTSource

    names = list(v.fn.arg_names)
    sig = {n: "constexpr" if n in v.constexprs else v.signature[n] for n in names}
    src = ASTSource(fn=v.fn, signature=sig,
                    constexprs={(names.index(k),): c for k, c in v.constexprs.items()})
    return triton.compile(src, target=target, options=v.options or None)


# -- reading the compiled code (sm_90: 65,536 registers, 64 warps, 32 programs, 228 KB of shared
# memory per SM) --------------------------------------------------------------------------------

SM_REGS, SM_WARPS, SM_PROGRAMS, SM_SMEM = 65536, 64, 32, 233472
#: the properties --require asserts of every update variant (the bandwidth floor, see README)
MIN_INFLIGHT = 128 * 1024
UPDATE_KERNELS = ("_update_kernel", "_run_update_kernel", "_units_update_kernel")
#: variants not yet at MIN_INFLIGHT, with the KB they reach (triton 3.6, the "iss" figure:
#: 16-byte data loads a thread has issued and not yet used x the threads an SM holds):
#: --require holds them to that figure so they cannot regress unnoticed. Keyed by ``short_key``:
#: (kernel, kind, 2-byte storage, FLAG); below fp32 (kernel, kind, DTYPE, SDTYPE, MODE, FLAG).
#: Each runs at the launch configuration bench/launch_sweep.py found best for it (no spills,
#: then the most in flight): 70 of the 312 variants reach 128 KB (48 of the 96 flat ones; before
#: that choice 19 of 96, with 37 spilling). What is short has few bytes an element or much
#: arithmetic per byte: 16-bit SGD moves 4-6 bytes an element (60-120 KB); bf16 with 8-bit
#: states 4-7, and the new states of a 256-block stay live until its absmax is known (32-60
#: KB: Adam, 8-bit, with stochastic rounding the least, its generator two fmix32 rounds on the
#: 64-bit index); 16-bit Adam holds fp32 working copies of 4 arrays, 80-100 registers at 4
#: warps (96-100 KB; 1 warp reached 128 KB by programs x block bytes but issued its loads in
#: rounds, 56 KB, and spilled). ALLoRA unit tiles add the per-unit scale and a row norm pass
#: (48-114 KB). The floor this figure is held to was measured as programs x block bytes, which
#: assumes every load of a program in flight at once; read from the SASS, fewer are.
#: The per-block (``_update_kernel``) keys left are those launched per block: FLAG launches
#: whose tensors differ in the optional state, and the variants the pipelined kernel does not
#: improve (kernels/optim.py, _RUN_LAUNCH: since the sweep's deeper pipelines, fp32 AdamW only,
#: which holds 192 KB); ``_run_update_kernel`` keys are the pipelined variants still short
#: (bench/results/run-sweep-sm90-20261202.txt).
KNOWN_SHORT = {("_units_update_kernel", L.KIND_ADAM, "bf16", "bf16", 1, False): 80,
               ("_units_update_kernel", L.KIND_ADAM, "bf16", "bf16", 1, True): 96,
               ("_units_update_kernel", L.KIND_ADAM, "bf16", "bf16", 2, False): 64,
               ("_units_update_kernel", L.KIND_ADAM, "bf16", "bf16", 2, True): 80,
               ("_units_update_kernel", L.KIND_ADAM, "bf16", "fp32", 0, False): 96,
               ("_units_update_kernel", L.KIND_ADAM, "bf16", "fp32", 0, True): 108,
               ("_units_update_kernel", L.KIND_ADAM, "bf16", "fp32", 1, False): 112,
               ("_units_update_kernel", L.KIND_ADAM, "bf16", "fp32", 1, True): 104,
               ("_units_update_kernel", L.KIND_ADAM, "fp16", "fp32", 1, False): 112,
               ("_units_update_kernel", L.KIND_ADAM, "fp16", "fp32", 1, True): 104,
               ("_units_update_kernel", L.KIND_ADAM, "fp32", "bf16", 0, False): 96,
               ("_units_update_kernel", L.KIND_ADAM, "fp32", "bf16", 0, True): 112,
               ("_units_update_kernel", L.KIND_ADAM, True, False): 80,
               ("_units_update_kernel", L.KIND_ADAM, True, True): 80,
               ("_units_update_kernel", L.KIND_SGD, "bf16", "bf16", 1, False): 64,
               ("_units_update_kernel", L.KIND_SGD, "bf16", "bf16", 1, True): 96,
               ("_units_update_kernel", L.KIND_SGD, "bf16", "bf16", 2, False): 60,
               ("_units_update_kernel", L.KIND_SGD, "bf16", "bf16", 2, True): 48,
               ("_units_update_kernel", L.KIND_SGD, "bf16", "fp32", 0, False): 64,
               ("_units_update_kernel", L.KIND_SGD, "bf16", "fp32", 0, True): 72,
               ("_units_update_kernel", L.KIND_SGD, "bf16", "fp32", 1, False): 64,
               ("_units_update_kernel", L.KIND_SGD, "bf16", "fp32", 1, True): 70,
               ("_units_update_kernel", L.KIND_SGD, "fp16", "fp32", 1, False): 64,
               ("_units_update_kernel", L.KIND_SGD, "fp16", "fp32", 1, True): 70,
               ("_units_update_kernel", L.KIND_SGD, "fp32", "bf16", 0, False): 112,
               ("_units_update_kernel", L.KIND_SGD, "fp32", "bf16", 0, True): 72,
               ("_units_update_kernel", L.KIND_SGD, False, False): 112,
               ("_units_update_kernel", L.KIND_SGD, False, True): 114,
               ("_units_update_kernel", L.KIND_SGD, True, False): 60,
               ("_units_update_kernel", L.KIND_SGD, True, True): 48,
               ("_update_kernel", L.KIND_ADAM, "bf16", "bf16", 1, True): 120,
               ("_update_kernel", L.KIND_ADAM, "bf16", "bf16", 2, True): 80,
               ("_update_kernel", L.KIND_ADAM, True, True): 100,
               ("_update_kernel", L.KIND_SGD, "bf16", "bf16", 1, True): 108,
               ("_update_kernel", L.KIND_SGD, "bf16", "bf16", 2, True): 56,
               ("_update_kernel", L.KIND_SGD, "bf16", "fp32", 0, True): 96,
               ("_update_kernel", L.KIND_SGD, "bf16", "uint8", 0, True): 90,
               ("_update_kernel", L.KIND_SGD, "bf16", "uint8", 1, True): 112,
               ("_update_kernel", L.KIND_SGD, "bf16", "uint8", 2, True): 60,
               ("_update_kernel", L.KIND_SGD, True, True): 72,
               # pipelined (_RUN_LAUNCH): bf16 Adam with 8-bit states, statistics and the
               # weight term, 2 programs an SM at 6 stages (214 registers) hold 120 KB; every
               # other pipelined variant holds 128 KB or more (3-8 stages)
               ("_run_update_kernel", L.KIND_ADAM, "bf16", "uint8", 0, False): 120}
#: the variants without the weight term in the gradient (L2=False: AdamW, weight_decay 0) that
#: hold less than KNOWN_SHORT's figure for their key at every launch configuration
#: (`launch_sweep.py --l2 false --key ...`, the best taken; the variant with the term keeps
#: KNOWN_SHORT's): leaving out one multiply and one add moved ptxas's allocation (bf16 Adam
#: with stochastic rounding per block was 112 -> 84 KB, 255 registers at 1 warp either way,
#: and bf16 SGD with 8-bit states and no momentum 128 -> 100, before they ran pipelined; fp32
#: SGD in ALLoRA units 112 -> 108). The other
#: L2=False variants are held to KNOWN_SHORT / MIN_INFLIGHT like those with the term (fp32
#: AdamW 192 KB, bf16 AdamW 128: the same as with it).
KNOWN_SHORT_NO_L2 = {("_units_update_kernel", L.KIND_SGD, False, False): 108,
                     ("_units_update_kernel", L.KIND_SGD, "fp32", "bf16", 0, False): 108,
                     ("_units_update_kernel", L.KIND_SGD, "bf16", "bf16", 1, True): 80,
                     # the [16, 128] and [8, 256] tiles (not in CI's --one-unit-class)
                     ("_units_update_kernel", L.KIND_SGD, "bf16", "bf16", 2, False): 52}
#: variants that spill (ptxas moves registers to local memory: STL / LDL in the SASS), with the
#: bytes of their spill stores (the STL instructions' widths summed over the listing, as ptxas
#: -v counts them): --require holds them to that figure. Keyed by ``spill_key`` (update
#: kernels as KNOWN_SHORT, other kernels by name), the largest of the variants behind a key
#: (STATS, unit classes, the finalize flags). No update variant spills: 181 of 312 did, up to
#: ~4 KB a thread, before the launch tables and the 256-element masked unit sub-tiles (a
#: register cap, maxnreg 128, made 286 spill instead). The finalize (28 bytes) and schedule
#: (612) kernels spill (triton 3.6, sm_90, every unit class).
KNOWN_SPILL: dict = {('_finalize_kernel',): 28,
                     ('_schedule_eval_kernel',): 612}
#: as KNOWN_SPILL for the variants without the weight term (L2=False; KNOWN_SHORT_NO_L2): bf16
#: Adam with stochastic rounding in [16, 128] unit tiles, 4 bytes at the table's (2, 4)
KNOWN_SPILL_NO_L2: dict = {("_units_update_kernel", L.KIND_ADAM, "bf16", "bf16", 2, False): 4}


def is_lowp(v: Variant) -> bool:
    """A variant below fp32: states in another storage than the parameter, or a MODE."""
    c = v.constexprs
    return "SDTYPE" in c and (str(c["SDTYPE"]) != str(c["DTYPE"]) or bool(c.get("MODE")))


def short_key(v: Variant) -> tuple:
    """The KNOWN_SHORT key of an update variant."""
    c = v.constexprs
    if is_lowp(v):
        return (v.name, c["KIND"], str(c["DTYPE"]), str(c["SDTYPE"]), c["MODE"], c["FLAG"])
    return (v.name, c["KIND"], _esize(v) == 2, c["FLAG"])


def spill_key(v: Variant) -> tuple:
    """The KNOWN_SPILL key of a variant: ``short_key`` for the update kernels, the kernel's
    name for the others."""
    return short_key(v) if v.name in UPDATE_KERNELS else (v.name,)


def _bin(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


_OP = re.compile(r"\b(LDGSTS|LDG|STG|LDL|STL|ATOMG|REDG|RED|ATOMS|ATOM|MEMBAR|CCTL)(?![A-Z])"
                 r"(\.[A-Z0-9_.]+)?")


def sass_ops(sass: str) -> dict:
    """Counts of the memory instructions of a SASS listing: global loads and stores by width
    (128/64/32 bits, U16), cp.async copies global -> shared (LDGSTS, by width), local-memory
    loads and stores (LDL / STL: spills, the kernels have no local arrays), atomics (ATOMG
    returns a value, REDG does not), fences (MEMBAR) and L1 invalidations (CCTL)."""
    counts: dict = {}
    for line in sass.splitlines():
        m = _OP.search(line)
        if not m:
            continue
        op, suf = m.group(1), m.group(2) or ""
        if op in ("LDG", "STG", "LDGSTS"):
            parts = suf.split(".")
            w = next((x for x in ("128", "64", "U16", "S16", "U8", "S8") if x in parts), "32")
            op = f"{op}.{w.lstrip('US')}"
        counts[op] = counts.get(op, 0) + 1
    return counts


def residency(regs: int, warps: int, smem: int) -> int:
    """Programs of ``warps`` warps at ``regs`` registers a thread that fit one SM (registers
    are allocated per warp in units of 256, i.e. 8 a thread)."""
    per_warp = -(-regs * 32 // 256) * 256
    by_regs = SM_REGS // per_warp // warps if per_warp else SM_PROGRAMS
    by_smem = SM_SMEM // (smem + 1024) if smem else SM_PROGRAMS
    return max(0, min(by_regs, SM_WARPS // warps, SM_PROGRAMS, by_smem))


_SIZES = {"fp32": 4, "bf16": 2, "fp16": 2, "uint8": 1}


def _esize(v: Variant, name: str = "DTYPE") -> int:
    return _SIZES.get(str(v.constexprs.get(name, v.constexprs.get("DTYPE"))), 4)


def program_bytes(v: Variant) -> int:
    """Bytes one program of ``v`` loads (the data, not the table rows): a block (update,
    statistics) or one tile of the update loop (ALLoRA units), with the optional state of the
    FLAG variants counted; below fp32: the states in SDTYPE, the fp32 master in place of the
    parameter (MODE_MASTER; the 8-bit scales, 1/64 of the codes, left out)."""
    c = v.constexprs
    if v.name in UPDATE_KERNELS:
        n = c["UNITS"] * c["CHUNK"] if v.name == "_units_update_kernel" else c["BLOCK"]
        states = (2 if c["KIND"] == L.KIND_ADAM else 0) + (1 if c["FLAG"] else 0)
        param = 4 if c.get("MODE", 0) & L.MODE_MASTER else _esize(v)
        return n * (param + _esize(v) + states * _esize(v, "SDTYPE"))
    if v.name == "_grad_stats_kernel":
        return c["BLOCK"] * _esize(v)
    return 0


@dataclass
class Code:
    """What the compiled code of a variant says."""

    warps: int
    regs: int
    spill: int  # bytes of spill stores (STL) in the listing, as ptxas -v counts them
    smem: int
    ops: dict
    #: floating-point instructions of the PTX that round differently from the CPU executor:
    #: contracted multiply-adds (``fma.rn.f32``) and approximate division / square root
    inexact: dict = field(default_factory=dict)
    #: bytes of 16-byte global loads a thread has issued and not yet used, at most
    #: (:func:`issued`)
    issued: int = 0
    #: pipelined kernels (``_run_update_kernel``): the bytes a program has copied ahead into
    #: shared memory, (STAGES - 1) x a block's (0: not pipelined)
    ahead: int = 0

    @property
    def programs(self) -> int:
        return residency(self.regs, self.warps, self.smem)

    @property
    def inflight(self) -> int:
        """Bytes of block data in flight per SM: the resident programs' threads x what each
        has issued and not yet used; pipelined, the resident programs x the blocks each has
        copied ahead (cp.async fills shared memory without holding a register)."""
        if self.ahead:
            return self.programs * self.ahead
        return self.programs * 32 * self.warps * self.issued


def read_code(ck, v: Variant | None = None) -> Code:
    """Registers, spills and the memory instructions of a compiled kernel, from its cubin with
    the cuobjdump Triton ships (nothing runs); ``v``: the variant, for a pipelined kernel's
    bytes copied ahead (:attr:`Code.ahead`)."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        cubin = os.path.join(d, "k.cubin")
        with open(cubin, "wb") as f:
            f.write(ck.asm["cubin"])
        res = subprocess.run([_bin("cuobjdump"), "-res-usage", cubin], capture_output=True,
                             text=True, check=True).stdout
        sass = subprocess.run([_bin("cuobjdump"), "-sass", cubin], capture_output=True,
                              text=True, check=True).stdout
    reg = re.search(r"REG:(\d+)", res)
    ahead = 0
    if v is not None and "STAGES" in v.constexprs:
        ahead = (v.constexprs["STAGES"] - 1) * program_bytes(v)
    return Code(ck.metadata.num_warps, int(reg.group(1)) if reg else -1, spill_bytes(sass),
                ck.metadata.shared, sass_ops(sass), ptx_inexact(ck.asm["ptx"]), issued(sass),
                ahead)


_STL = re.compile(r"\bSTL(\.[A-Z0-9_.]+)?\s")


def spill_bytes(sass: str) -> int:
    """Bytes of the spill stores of a SASS listing: the widths of its STL instructions summed
    (each written once in the listing, as ptxas -v's "bytes spill stores"). Spills are not in
    cuobjdump's LOCAL (0 for them) but in its STACK, which also holds call frames."""
    return sum(_access_bytes("STL" + (m.group(1) or "")) for m in _STL.finditer(sass))


def _access_bytes(op: str) -> int:
    """Bytes one thread moves with a load or store instruction (``LDG.E.128``: 16, ``.64``: 8,
    ``.U16`` / ``.S16``: 2, ``.U8`` / ``.S8``: 1, else 4); 4-byte registers: bytes // 4, one
    at least."""
    parts = set(op.split("."))
    return 16 if "128" in parts else 8 if "64" in parts else 2 if {"U16", "S16"} & parts \
        else 1 if {"U8", "S8"} & parts else 4


_INS = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?(\S+)\s*([^;]*);")
_REG = re.compile(r"\bR(\d+)(\.64)?\b")


def _regs(text: str) -> set:
    out = set()
    for m in _REG.finditer(text):
        out.add(int(m.group(1)))
        if m.group(2):
            out.add(int(m.group(1)) + 1)
    return out


def issued(sass: str) -> int:
    """The most bytes of 16-byte global loads (LDG.E.128: the full blocks' data) one thread has
    in flight, read from the SASS in program order: a load is in flight from its issue to the
    first instruction that names one of its destination registers (where the thread waits for
    it). A straight scan across branches, so an estimate; it shows what the programs x
    block-bytes figure assumes (every load of a program in flight at once) against what ptxas
    scheduled: at 255 registers it issues a thread's loads in several rounds. The table and
    scalar loads (the same few addresses in every thread: cache hits, not memory traffic) are
    left out: counted, they made a 1-warp program of 8 elements a thread look like 144 KB
    where its blocks hold 96."""
    pending: dict = {}  # register -> the load (a one-element list of its bytes)
    most = 0
    for m in _INS.finditer(sass):
        op, args = m.group(1), m.group(2)
        dst, src = (args.split(",", 1) + [""])[:2] if op.startswith("LDG") else ("", args)
        for r in _regs(src) & pending.keys():
            load = pending.get(r)
            for q in [q for q, x in pending.items() if x is load]:
                del pending[q]
        if op.startswith("LDG") and _access_bytes(op) == 16:
            regs = sorted(_regs(dst))
            if regs:
                load = [_access_bytes(op)]
                for q in range(regs[0], regs[0] + max(1, load[0] // 4)):
                    pending[q] = load
        most = max(most, sum(x[0] for x in {id(x): x for x in pending.values()}.values()))
    return most


_INEXACT = re.compile(r"\b(fma\.rn(?:\.ftz)?(?:\.sat)?\.f32(?:x2)?|div\.(?:full|approx)[.\w]*f32|"
                      r"(?:sqrt|rsqrt|rcp|ex2|lg2)\.approx[.\w]*f32)\b")


def ptx_inexact(ptx: str) -> dict:
    """Counts of the fp32 instructions whose result may differ from the CPU's IEEE operations
    done one by one (see :data:`Code.inexact`)."""
    counts: dict = {}
    for m in _INEXACT.finditer(ptx):
        counts[m.group(1)] = counts.get(m.group(1), 0) + 1
    return counts


def requirements(v: Variant, code: Code) -> list[str]:
    """What is wrong with the code of ``v`` (empty: nothing): no spills (beyond the bytes of
    KNOWN_SPILL, for the variants that spilled when the check began to see spills); every update
    variant keeps >= 128 KB of loads in flight per SM and has no fence (MEMBAR / CCTL) and no
    value-returning atomic; a flat update or statistics kernel reads and writes its full
    blocks with 16-byte instructions only (the count of LDG.E.128 x 16 bytes x threads covers
    a whole block of every array)."""
    bad = []
    allowed = KNOWN_SPILL.get(spill_key(v), 0)
    if not v.constexprs.get("L2", True):
        allowed = max(allowed, KNOWN_SPILL_NO_L2.get(spill_key(v), 0))
    if code.spill > allowed:
        bad.append(f"{code.spill} bytes of spill stores > {allowed}")
    if v.name in UPDATE_KERNELS or v.name == "_grad_stats_kernel":
        fences = {k: n for k, n in code.ops.items() if k in ("MEMBAR", "CCTL", "ATOMG", "ATOM")}
        if fences:
            bad.append(f"fences or acquiring atomics: {fences}")
    if v.name in UPDATE_KERNELS and code.inexact:
        # the update's arithmetic is the CPU executor's, operation for operation (kernels/
        # optim.py: _go compiles without contraction; div_rn / sqrt_rn), so that stochastic
        # rounding bits and 8-bit codes equal the CPU's at rounding boundaries too
        bad.append(f"fp32 instructions the CPU does not round alike: {code.inexact}")
    if v.name in UPDATE_KERNELS:  # in KB as the table prints them (rounded)
        floor = min(MIN_INFLIGHT // 1024, KNOWN_SHORT.get(short_key(v), MIN_INFLIGHT // 1024))
        if not v.constexprs.get("L2", True):
            floor = min(floor, KNOWN_SHORT_NO_L2.get(short_key(v), floor))
        if round(code.inflight / 1024) < floor:
            bad.append(f"{code.inflight / 1024:.0f} KB in flight per SM < {floor} KB")
    if v.name in ("_update_kernel", "_run_update_kernel", "_grad_stats_kernel"):
        threads = 32 * code.warps
        # pipelined: the full blocks' loads are cp.async copies; a 16-byte load left in
        # registers is one the pipeliner did not reach (a load under a runtime branch)
        op = "LDGSTS.128" if v.name == "_run_update_kernel" else "LDG.128"
        ld = code.ops.get(op, 0) * 16 * threads
        want = program_bytes(v)
        if ld < want:
            bad.append(f"16-byte loads cover {ld} of the {want} bytes of a full block")
        if v.name != "_grad_stats_kernel" and not code.ops.get("STG.128"):
            bad.append("no 16-byte stores")
        if v.name == "_run_update_kernel" and code.ops.get("LDG.128"):
            bad.append(f"{code.ops['LDG.128']} 16-byte loads not pipelined (LDG.128)")
    return bad


def row(v: Variant, code: Code) -> str:
    c = {k: str(x).replace("triton.language.", "") for k, x in v.constexprs.items()}
    ops = " ".join(f"{k}:{n}" for k, n in sorted(code.ops.items()))
    kb = code.programs * program_bytes(v) / 1024
    iss = code.inflight / 1024
    return (f"{v.name:22s} {' '.join(f'{k}={x}' for k, x in c.items()):62s} "
            f"w{code.warps:<2d} r{code.regs:<3d} sp{code.spill:<3d} p{code.programs:<2d} "
            f"{kb:6.0f}KB iss{iss:4.0f}KB  {ops}" +
            (f"  inexact {code.inexact}" if code.inexact else ""))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability (90: H100)")
    ap.add_argument("--first", action="store_true", help="stop at the first failure")
    ap.add_argument("--quick", action="store_true",
                    help="one variant of each kernel, the one with the most features on")
    ap.add_argument("--kernels", default="",
                    help="comma-separated kernel names: compile only their variants")
    ap.add_argument("--table", action="store_true",
                    help="print per variant: warps, registers, spills, programs per SM, KB of "
                         "loads in flight per SM, memory instructions, atomics and fences")
    ap.add_argument("--one-unit-class", action="store_true",
                    help="ALLoRA units: only the variants of the first unit class (the classes "
                         "differ in tile shape only; CI, to stay within its time)")
    ap.add_argument("--no-lowp", action="store_true",
                    help="leave out the variants below fp32 (lowp_configs)")
    ap.add_argument("--require", action="store_true",
                    help="fail a variant whose code breaks the properties of requirements() "
                         "(implies --table)")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":  # the kernels were made interpreted
        print("unset TRITON_INTERPRET: this compiles the kernels", file=sys.stderr)
        return 2
    from triton.backends.compiler import GPUTarget

    target = GPUTarget("cuda", args.arch, 32)
    t0 = time.perf_counter()
    try:
        vs, n_cfg = variants(lowp=not args.no_lowp)
    except RuntimeError as e:
        print(f"FAIL {e}")
        print(f"0 compiled, 1 failed (sm_{args.arch})")
        return 1
    n_all = len(vs)
    if args.quick:  # and one variant below fp32 of each update kernel
        vs = pick_quick([v for v in vs if not is_lowp(v)]) + pick_quick(
            [v for v in vs if is_lowp(v)])
    if args.kernels:
        vs = [v for v in vs if v.name in args.kernels.split(",")]
    if args.one_unit_class:
        nu = UNIT_CLASSES[0][1]
        vs = [v for v in vs if v.name != "_units_update_kernel" or v.constexprs["UNITS"] == nu]
    print(f"{n_all} variants of {len({v.name for v in vs})} kernels from {n_cfg} "
          f"configurations ({time.perf_counter() - t0:.1f} s); compiling {len(vs)}")
    table = args.table or args.require
    compiled = failed = 0
    t1 = time.perf_counter()
    for v in vs:
        try:
            ck = compile_variant(v, target)
            compiled += 1
        except Exception as e:  # report every failing variant, then exit non-zero
            failed += 1
            print(f"FAIL {v.name} {v.signature} {v.constexprs} (from: {v.source}): "
                  f"{type(e).__name__}: {str(e)[:2000]}")
            if args.first:
                break
            continue
        if table:
            code = read_code(ck, v)
            print(row(v, code), flush=True)
            bad = requirements(v, code) if args.require else []
            if bad:
                failed += 1
                print(f"FAIL {v.name} (from: {v.source}): {'; '.join(bad)}")
                if args.first:
                    break
    print(f"compiled in {time.perf_counter() - t1:.1f} s (triton {triton.__version__})")
    print(f"{compiled} compiled, {failed} failed (sm_{args.arch})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

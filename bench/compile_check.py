"""Compile every Triton kernel for a GPU target without a GPU (front end to PTX/cubin).

Catches what the interpreter never sees (non-constexpr globals, type errors in compiled
control flow, unsupported ops), e.g. ``python bench/compile_check.py --arch 90``. Run without
``TRITON_INTERPRET``.

The signatures are not typed by hand: :func:`variants` runs the optimizers' real host path
(``TableBuilder`` -> ``functional.adam`` / ``sgd`` -> the launchers, and ``evaluate_schedule``)
on CPU tensors for every configuration of :func:`configs`, with each kernel's ``run`` replaced by
a recorder, and types each recorded launch from its arguments. A launcher that passes another
argument, dtype or constexpr changes what is compiled here without an edit to this file.
Importable without compiling (``tests/test_compile.py`` checks the coverage in process).
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import itertools
import math
import os
import sys
import time
from dataclasses import dataclass, field

import torch
import triton
from fastsched.kernels import layout as L
from fastsched.kernels import optim as ko
from fastsched.kernels import schedule as ks
from triton.runtime.jit import KernelInterface

from fastsched.optim import functional
from fastsched.optim._tables import DEFAULT_BLOCK, UNIT_CLASSES, Entry, StepBuffers, TableBuilder
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
    flag: bool  # amsgrad (Adam) / momentum (SGD): the optional state exists
    options: StepOptions
    scaler: bool  # GradScaler's grad_scale / found_inf handed to the step
    unit: str | None  # ALLoRA unit of the extra tensors (one per unit class); None: none

    def __str__(self) -> str:
        o = self.options
        return (f"{'adam' if self.kind == L.KIND_ADAM else 'sgd'} {str(self.dtype)[6:]} "
                f"aligned={self.aligned} flag={self.flag} max_grad_norm={o.max_grad_norm} "
                f"stats={o.stats} nonfinite={o.mode} history={o.history} "
                f"scaler={self.scaler} allora={self.unit}")


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


def configs() -> list[Config]:
    """Every combination of what the host path branches on: 2 kinds x 3 dtypes x aligned x flag
    x 16 option sets x scaler x 4 ALLoRA settings = 3,072 steps, ~2.5 s of host work (the
    variants they launch are deduplicated; --quick picks among them too)."""
    opts = [StepOptions(max_grad_norm=m, stats=s, nonfinite=nf, history=h)
            for m, s, nf, h in itertools.product((None, 1.0), (False, True), ("skip", "ignore"),
                                                 (0, 4))]
    return [Config(*c) for c in itertools.product(KINDS, DTYPES, (True, False), (True, False),
                                                  opts, (True, False), ALLORA_UNITS)]


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
        p = _tensor(shape, cfg.dtype, cfg.aligned)
        g = _tensor(shape, cfg.dtype, cfg.aligned)
        # states as _init_state makes them: fresh allocations, so aligned whatever p is
        if cfg.kind == L.KIND_ADAM:
            states = (torch.zeros_like(p), torch.zeros_like(p),
                      torch.zeros_like(p) if cfg.flag else None)
        else:
            states = (torch.zeros_like(p) if cfg.flag else None, None, None)
        out.append(Entry(p, g, 0, states, torch.zeros((), dtype=torch.float32), unit))
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
                  allora_eta=None if cfg.unit is None else 1.0, **scaler)
    if cfg.kind == L.KIND_ADAM:
        functional.adam(plan, buffers, amsgrad=cfg.flag, **common)
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


def variants() -> tuple[list[Variant], int]:
    """(the distinct variants in first-launch order, how many configurations launched them).

    Raises on the first configuration whose host path fails, naming it."""
    launched: list[Variant] = []
    source = [""]
    cfgs = configs()
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
    flags = sum(1 for x in v.constexprs.values() if x is True)
    return (flags, str(v.constexprs.get("DTYPE")) == "bf16")


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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability (90: H100)")
    ap.add_argument("--first", action="store_true", help="stop at the first failure")
    ap.add_argument("--quick", action="store_true",
                    help="one variant of each kernel, the one with the most features on (CI)")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":  # the kernels were made interpreted
        print("unset TRITON_INTERPRET: this compiles the kernels", file=sys.stderr)
        return 2
    from triton.backends.compiler import GPUTarget

    target = GPUTarget("cuda", args.arch, 32)
    t0 = time.perf_counter()
    try:
        vs, n_cfg = variants()
    except RuntimeError as e:
        print(f"FAIL {e}")
        print(f"0 compiled, 1 failed (sm_{args.arch})")
        return 1
    n_all = len(vs)
    if args.quick:
        vs = pick_quick(vs)
    print(f"{n_all} variants of {len({v.name for v in vs})} kernels from {n_cfg} "
          f"configurations ({time.perf_counter() - t0:.1f} s)"
          + (f"; compiling {len(vs)} (--quick)" if args.quick else ""))
    compiled = failed = 0
    t1 = time.perf_counter()
    for v in vs:
        try:
            compile_variant(v, target)
            compiled += 1
        except Exception as e:  # report every failing variant, then exit non-zero
            failed += 1
            print(f"FAIL {v.name} {v.signature} {v.constexprs} (from: {v.source}): "
                  f"{type(e).__name__}: {str(e)[:2000]}")
            if args.first:
                break
    print(f"compiled in {time.perf_counter() - t1:.1f} s (triton {triton.__version__})")
    print(f"{compiled} compiled, {failed} failed (sm_{args.arch})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

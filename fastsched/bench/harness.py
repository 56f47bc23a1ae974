"""The benchmark run: every contender of every configuration on every shape set and dtype.

Timing (per contender, after a first step and a warm-up):

* back-to-back: blocks of ``k`` steps, synchronised once per block (CUDA events on a GPU), time
  per step = block time / k; median, p10 and p90 over the blocks;
* latency: single steps, each synchronised before and after (host wall clock, so host launch
  time counts); median, p10 and p90.

Derived numbers are computed from the recorded timings by :func:`derive`, never typed:
GB/s = bytes per parameter x parameters / back-to-back median (the bytes of the configuration,
computed from its storage for the configurations below fp32); % of the copy bandwidth measured
in the same run; speedup = the best torch (or torchao / bitsandbytes) contender's back-to-back
median in the same (shape set, dtype, configuration, thread count) / this contender's; % of
stream = GB/s / the stream ceiling's GB/s (CPU: the compiled extension's in-place kernel with
AdamW's access pattern, timed in the same run); vs fp32 AdamW (configurations below fp32) = the
back-to-back median of torch's fused fp32 AdamW timed in the same rounds / this contender's; vs
plain step (ALLoRA) = the same for fastsched's AdamW without ALLoRA on the same tensors.
The optimizer state each contender holds is measured after its first step (bytes of every state
tensor but ``step``, per parameter).

On the CPU the contenders of one configuration are built together and timed in interleaved
rounds (one block of every contender per round, the order reversed every other round), so that
the load of a shared machine falls on all of them alike, fastsched's contenders built first and
ALLoRA's plain step last (an optimizer built second measured 1-3% faster than an identical one
built first there); the
default CPU run takes every thread count in ``threads`` (1 and 2 on a machine with 2 cores),
GPT-2 and Llama-1B at scale 0.1 (their optimizer states exceed the last-level cache), fp32 and
bf16, AdamW, clip + AdamW + schedule, ALLoRA + AdamW and SGD, with torch's fused optimizers,
fastsched and the stream ceiling.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import json
import math
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .contenders import (
    CLIP_NORM,
    CONFIGS,
    CONTENDERS,
    DEFAULT_CONFIGS,
    HYPER,
    LOWP_CONFIGS,
    SGD_HYPER,
    Built,
    Contender,
    Setup,
    Skipped,
    Unavailable,
    contenders_for,
    leaves_of,
    library_versions,
    params_of,
    state_nbytes,
)
from .device import Device, MemoryMeter, copy_bandwidth, environment, quantiles, slug
from .shapes import SHAPE_SETS, ShapeSet, get_shape_set

__all__ = ["BenchOptions", "TimingPlan", "run_bench", "derive", "save_results", "DTYPES",
           "CPU_DEFAULT_SCALE", "CPU_DEFAULT_SETS", "CPU_DEFAULT_CONFIGS", "SCHEMA",
           "thread_counts", "LOWP_CONFIGS", "check_dtypes"]

SCHEMA = "fastsched-bench/1"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_DTYPE_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
#: GPT-2 small at 0.1: 12.5M parameters, 200 MB of AdamW state (p, g, m, v) against a
#: last-level cache of tens of MB, so a step streams from memory as the full model's does (a
#: larger cache, as a server's shared L3 of 260 MiB, is named in the report: report._cache_lines)
CPU_DEFAULT_SCALE = 0.1
CPU_DEFAULT_SETS = ("gpt2", "llama-1b")
CPU_DEFAULT_CONFIGS = ("adamw", "adamw-clip", "allora", "sgd")
#: torch.compile of a 148-tensor AdamW step builds C++ for minutes on a 2-core CPU
CPU_COMPILE_REASON = ("torch.compile on a CPU generates and builds C++ for minutes; "
                      "pass --compile to include it")


def dtype_key(name: str) -> str:
    key = _DTYPE_ALIASES.get(name, name)
    if key not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; expected one of {', '.join(DTYPES)}")
    return key


@dataclass
class TimingPlan:
    """How many steps to time; adapted to each contender's speed from its warm-up."""

    warmup_min: int
    warmup_s: float
    blocks: int
    block_s: float
    latency_min: int
    latency_max: int
    latency_s: float
    slow_s: float  # a contender slower than this per step gets the minimum counts

    @classmethod
    def for_device(cls, cuda: bool, quick: bool) -> TimingPlan:
        if cuda:
            if quick:
                return cls(2, 0.02, 5, 0.01, 5, 25, 0.04, 0.5)
            return cls(3, 0.05, 10, 0.02, 5, 50, 0.1, 0.5)
        # the CPU run: interleaved rounds (blocks = rounds) of blocks of ~block_s
        if quick:
            return cls(1, 0.0, 2, 0.005, 2, 3, 0.01, 0.05)
        return cls(2, 0.02, 11, 0.04, 3, 3, 0.02, 0.1)


@dataclass
class BenchOptions:
    sets: list[str] | None = None  # None: every set on a GPU, CPU_DEFAULT_SETS on the CPU
    custom: ShapeSet | None = None
    dtypes: list[str] | None = None  # None: fp32 and bf16
    configs: list[str] | None = None  # None: DEFAULT_CONFIGS on a GPU, CPU_DEFAULT_CONFIGS
    contenders: list[str] | None = None  # None: all on a GPU, CPU_CONTENDERS on the CPU
    scale: float | None = None  # None: 1 on a GPU, CPU_DEFAULT_SCALE on the CPU
    quick: bool = False
    compile: bool | None = None  # None: on for a GPU, off for the CPU
    compile_budget_s: float | None = None  # None: 150 s, 60 s with quick
    compile_max_tensors: int = 512
    device: str | None = None
    out: Path | None = Path("bench/results")
    plot: bool = True
    progress: bool = True
    seed: int = 0
    copy_mib: int | None = None
    #: torch CPU threads, one count or several (each a run of its own); None: 1 and 2 on the
    #: CPU (as many as there are cores, at most 2), unchanged on a GPU
    threads: int | list[int] | None = None
    time_limit_s: float | None = None  # no new contender once the run is this old
    argv: list[str] | None = None  # the command line, recorded in the results


def _default_lists(opts: BenchOptions, dev: Device) -> BenchOptions:
    """``opts`` with the device's defaults for the sets and configurations left as None."""
    import dataclasses

    cpu = not dev.is_cuda
    sets = opts.sets if opts.sets is not None else list(
        CPU_DEFAULT_SETS if cpu else SHAPE_SETS)
    configs = opts.configs if opts.configs is not None else list(
        CPU_DEFAULT_CONFIGS if cpu else DEFAULT_CONFIGS)
    return dataclasses.replace(opts, sets=sets, configs=configs)


def thread_counts(dev: Device, threads: int | list[int] | None) -> list[int | None]:
    """The torch thread counts of a run (None: leave torch's setting)."""
    if isinstance(threads, int):
        return [threads]
    if threads:
        return list(dict.fromkeys(threads))
    if dev.is_cuda:
        return [None]
    import os

    return list(range(1, min(2, os.cpu_count() or 1) + 1))


def _shape_sets(opts: BenchOptions, scale: float) -> list[ShapeSet]:
    """The named sets at ``scale``; the user's own shapes as given unless --scale was given."""
    sets = [get_shape_set(n).scaled(scale) for n in opts.sets]
    if opts.custom is not None:
        sets.append(opts.custom.scaled(opts.scale if opts.scale is not None else 1.0))
    return sets


def _free(dev: Device) -> None:
    gc.collect()
    dev.empty_cache()


def _short(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    text = f"{type(e).__name__}: {msg[0] if msg else ''}".strip()
    return text if len(text) <= 400 else text[:397] + "..."


class _CompileGate:
    """Decides whether a torch.compile contender runs: switch, tensor count, time budget."""

    def __init__(self, enabled: bool, reason_off: str, budget_s: float, max_tensors: int):
        self.enabled, self.reason_off = enabled, reason_off
        self.budget_s, self.max_tensors = budget_s, max_tensors
        self.spent_s = 0.0
        self.per_tensor_s = 0.0
        self.time_left_s: float | None = None  # of the run's --time-limit

    def check(self, tensors: int) -> None:
        if not self.enabled:
            raise Skipped(self.reason_off)
        if tensors > self.max_tensors:
            raise Skipped(f"{tensors} tensors > --compile-max-tensors {self.max_tensors} "
                          "(compile time grows with the tensor count)")
        est = self.per_tensor_s * tensors
        if self.spent_s > 0 and self.spent_s + est > self.budget_s:
            raise Skipped(f"--compile-budget {self.budget_s:.0f} s: {self.spent_s:.0f} s spent, "
                          f"this compile estimated at {est:.0f} s from the earlier ones")
        if self.time_left_s is not None and self.spent_s > 0 and est > self.time_left_s:
            raise Skipped(f"--time-limit: {self.time_left_s:.0f} s left, this compile estimated "
                          f"at {est:.0f} s from the earlier ones")

    def record(self, seconds: float, tensors: int) -> None:
        self.spent_s += seconds
        self.per_tensor_s = max(self.per_tensor_s, seconds / max(tensors, 1))


def _measure(built: Built, dev: Device, plan: TimingPlan, meter: MemoryMeter
             ) -> dict[str, Any]:
    step = built.step
    # the second step, synchronised, estimates the step time (the first one may include
    # compiles and state allocation); for a slow contender it is also its first latency sample
    est = dev.time_single(step)
    steps = 2
    slow = est > plan.slow_s
    lat: list[float] = [est] if slow else []
    if not slow:
        n, t0 = 0, time.perf_counter()
        while n < plan.warmup_min or (time.perf_counter() - t0 < plan.warmup_s and n < 50):
            step()
            n += 1
            if n == plan.warmup_min:
                dev.sync()
        dev.sync()
        est = max((time.perf_counter() - t0) / n, 1e-7)
        steps += n
    meter.sample()
    per_block = max(1, min(1000, round(plan.block_s / est)))
    blocks = 2 if slow else plan.blocks
    b2b = []
    for _ in range(blocks):
        b2b.append(dev.time_block(step, per_block))
        meter.sample()
    steps += blocks * per_block
    lat_n = 2 if slow else max(plan.latency_min, min(plan.latency_max,
                                                     round(plan.latency_s / est)))
    while len(lat) < lat_n:
        lat.append(dev.time_single(step))
        meter.sample()
        steps += 1
    return {"b2b_s": {**quantiles(b2b), "steps_per_block": per_block},
            "latency_s": quantiles(lat), "steps": steps}


def _start_entry(sset: ShapeSet, dtype: str, config: str, key: str, master, dev: Device,
                 schedule, shared: dict, gate: _CompileGate, threads: int | None):
    """Build one contender and run its first step: (record, built or None, meter)."""
    cont = CONTENDERS[key]
    cfg = CONFIGS[config]
    tdtype = DTYPES[dtype]
    rec: dict[str, Any] = {
        "set": sset.name, "dtype": dtype, "config": config, "contender": key,
        "title": cont.title, "family": cont.family, "graph": cont.graph,
        "params": sset.params, "tensors": sset.tensors, "threads": threads,
        "bytes_per_param": cont.bytes_per_param(cfg, tdtype, sset.shapes), "status": "ok",
        "reason": "",
    }
    built = None
    meter = MemoryMeter(dev)
    try:
        if cont.compiles and "compile_error" in shared:
            raise RuntimeError(f"as in the {shared['compile_error']}")
        if cont.compiles and "compile" not in shared:
            gate.check(sset.tensors)
        params = leaves_of(master)
        meter.start()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t0 = time.perf_counter()
            built = cont.build(Setup(params, dev, tdtype, cfg, schedule, shared))
            meter.sample()
            built.step()
            dev.sync()
            first_s = time.perf_counter() - t0
            meter.sample()
            if built.after_first is not None:
                built.after_first()
            rec["first_step_s"] = first_s
            _record_state(rec, built, cont, cfg, tdtype, sset)
            if cont.compiles and "compile_s" not in built.info:
                shared["compile"]["compile_s"] = first_s
                rec["compile_s"] = first_s
                gate.record(first_s, sset.tensors)
        built.keep = (built.keep, params)
    except Exception as e:  # noqa: BLE001 - one failing contender must not end the run
        _failed(rec, e, cont, config, shared)
        built = None
    return rec, built, meter


def _optimizer_in(obj) -> Any:
    """The optimizer among what a built contender keeps (an object with a ``state`` mapping)."""
    if isinstance(obj, torch.optim.Optimizer):
        return obj
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, list | tuple):
        for o in obj:
            found = _optimizer_in(o)
            if found is not None:
                return found
    return None


def _record_state(rec: dict, built: Built, cont: Contender, cfg, tdtype, sset) -> None:
    """The optimizer state held after the first step, per parameter (every state tensor but
    ``step``; a contender with no optimizer, the stream ceiling, records none)."""
    if built.states is not None:
        states = list(built.states())
    else:
        opt = _optimizer_in(built.keep)
        if opt is None:
            return
        states = list(opt.state.values())
    nbytes = state_nbytes(states)
    rec["state_bytes"] = nbytes
    rec["state_bytes_per_param"] = nbytes / max(1, sset.params)
    if cont.family in ("fastsched", "baseline", "plain"):
        rec["state_bytes_formula"] = cont.state_formula(cfg, tdtype, sset.shapes)


def _failed(rec: dict, e: BaseException, cont: Contender, config: str, shared: dict) -> None:
    if isinstance(e, Unavailable):
        rec.update(status="unavailable", reason=str(e))
    elif isinstance(e, Skipped):
        rec.update(status="skipped", reason=str(e))
    else:
        rec.update(status="error", reason=_short(e))
        if cont.compiles and "compile_error" not in shared:
            shared.pop("compile", None)
            shared["compile_error"] = f"{config} entry: {rec['reason']}"


def _finish(rec: dict, built: Built, meter: MemoryMeter) -> None:
    rec["peak_mem_bytes"] = meter.peak()
    rec.update({k: v for k, v in built.info.items() if k not in rec})


def _run_entry(sset: ShapeSet, dtype: str, config: str, key: str, master, dev: Device,
               plan: TimingPlan, schedule, shared: dict, gate: _CompileGate,
               threads: int | None = None) -> dict[str, Any]:
    rec, built, meter = _start_entry(sset, dtype, config, key, master, dev, schedule, shared,
                                     gate, threads)
    try:
        if built is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                rec.update(_measure(built, dev, plan, meter))
            _finish(rec, built, meter)
    except Exception as e:  # noqa: BLE001
        _failed(rec, e, CONTENDERS[key], config, shared)
    finally:
        del built
        _free(dev)
    return rec


def _measure_interleaved(lives: list[tuple[dict, Built, MemoryMeter]], dev: Device,
                         plan: TimingPlan) -> list[dict[str, Any]]:
    """Time the contenders in interleaved rounds: each round one block of every contender (the
    order reversed every other round), then single synchronised steps in the same way."""
    ests = []
    for _, built, meter in lives:
        with meter.window():
            est = dev.time_single(built.step)
            n, t0 = 0, time.perf_counter()
            while n < plan.warmup_min or (time.perf_counter() - t0 < plan.warmup_s and n < 50):
                built.step()
                n += 1
            dev.sync()
        ests.append(max(min(est, (time.perf_counter() - t0) / max(n, 1)), 1e-7))
    per_block = [max(1, min(1000, round(plan.block_s / e))) for e in ests]
    b2b: list[list[float]] = [[] for _ in lives]
    lat: list[list[float]] = [[] for _ in lives]
    order = list(range(len(lives)))
    for r in range(plan.blocks):
        for i in (order if r % 2 == 0 else order[::-1]):
            with lives[i][2].window():
                b2b[i].append(dev.time_block(lives[i][1].step, per_block[i]))
    for r in range(plan.latency_min):
        for i in (order if r % 2 == 0 else order[::-1]):
            with lives[i][2].window():
                lat[i].append(dev.time_single(lives[i][1].step))
    # rounds_s: the time a step of each round's block, in round order, so that two contenders
    # of the same rounds compare round by round (paired_ratio)
    return [{"b2b_s": {**quantiles(b2b[i]), "steps_per_block": per_block[i]},
             "rounds_s": b2b[i],
             "latency_s": quantiles(lat[i]),
             "steps": 2 + plan.warmup_min + plan.blocks * per_block[i] + plan.latency_min,
             "timing": "interleaved"} for i in range(len(lives))]


def paired_ratio(num: dict[str, Any], den: dict[str, Any]) -> dict[str, float] | None:
    """Quantiles of num's step time / den's, round by round, for two entries timed in the same
    interleaved rounds (None otherwise, or for results saved before rounds were recorded). A
    ratio of medians hides how far the machine moved between rounds: on a shared 2-vCPU VM the
    same ALLoRA-against-plain ratio read 1.07x in one run and 1.21x in the next; the spread of
    the per-round ratios says how much a single figure can be trusted."""
    a, b = num.get("rounds_s"), den.get("rounds_s")
    if not a or not b or len(a) != len(b):
        return None
    return quantiles([x / y for x, y in zip(a, b)])


def _run_interleaved(sset: ShapeSet, dtype: str, config: str, keys: list[str], master,
                     dev: Device, plan: TimingPlan, schedule, shared: dict, gate: _CompileGate,
                     threads: int | None) -> list[dict[str, Any]]:
    """Every contender of one configuration, built together and timed in interleaved rounds."""
    recs: list[dict[str, Any] | None] = [None] * len(keys)
    lives = []
    # fastsched's contenders are built first (their tensors and first-step states allocated
    # before the others'), the plain step ALLoRA is held to last: on the shared CPU VM an
    # optimizer built second ran 1-3% faster than an identical one built first (Llama-1B x0.1,
    # 1 thread, fused AdamW and fastsched alike), so the order leans against fastsched's
    # claims (speedups, ALLoRA within 10% of the plain step), never for them
    rank = {"fastsched": 0, "plain": 2}
    order = sorted(range(len(keys)), key=lambda i: rank.get(CONTENDERS[keys[i]].family, 1))
    try:
        for i in order:
            rec, built, meter = _start_entry(sset, dtype, config, keys[i], master, dev,
                                             schedule, shared, gate, threads)
            recs[i] = rec
            if built is not None:
                # the contenders built after this one allocate too: from here on its peak
                # grows only with what its own steps add (it counted every contender built
                # later: fastsched's AdamW on GPT-2 x0.1 showed 525 MiB for 95 MiB of state)
                meter.close()
                lives.append((rec, built, meter))
        if lives:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                timed = _measure_interleaved(lives, dev, plan)
            for (rec, built, meter), t in zip(lives, timed):
                rec.update(t)
                _finish(rec, built, meter)
    except Exception as e:  # noqa: BLE001 - a failure while timing: the timed ones say so
        for rec, _, _ in lives:
            if "b2b_s" not in rec:
                _failed(rec, e, CONTENDERS[rec["contender"]], config, shared)
    finally:
        del lives
        _free(dev)
    return [r for r in recs if r is not None]


def _skipped_entry(sset: ShapeSet, dtype: str, config: str, key: str, why: str,
                   threads: int | None = None) -> dict:
    cont = CONTENDERS[key]
    return {"set": sset.name, "dtype": dtype, "config": config, "contender": key,
            "title": cont.title, "family": cont.family, "graph": cont.graph,
            "params": sset.params, "tensors": sset.tensors, "threads": threads,
            "bytes_per_param": cont.bytes_per_param(CONFIGS[config], DTYPES[dtype],
                                                    sset.shapes),
            "status": "skipped", "reason": why}


#: the families a speedup is measured against: torch's and the libraries' optimizers
PEER_FAMILIES = ("torch", "library")


def derive(results: dict[str, Any]) -> dict[str, Any]:
    """Fill GB/s, % of copy, speedups, the ratio to torch's fused fp32 AdamW and (ALLoRA) to
    fastsched's plain step of every entry from the recorded timings (in place)."""
    copy = results["copy"]["gbps"]
    entries = results["results"]
    best: dict[tuple, dict] = {}
    best_lat: dict[tuple, dict] = {}
    stream: dict[tuple, float] = {}
    baseline: dict[tuple, dict] = {}  # (set, dtype, config, threads): fp32 AdamW, same rounds
    fp32_adamw: dict[tuple, dict] = {}  # (set, threads): the adamw entry of torch fused, fp32
    plain: dict[tuple, dict] = {}  # (set, dtype, config, threads): fastsched's plain step
    for r in entries:
        if r["status"] != "ok":
            continue
        if r["family"] == "baseline":
            baseline[(r["set"], r["dtype"], r["config"], r.get("threads"))] = r
        if r["family"] == "plain":
            plain[(r["set"], r["dtype"], r["config"], r.get("threads"))] = r
        if (r["config"], r["contender"], r["dtype"]) == ("adamw", "torch-fused", "fp32"):
            fp32_adamw[(r["set"], r.get("threads"))] = r
    for r in entries:
        if r["status"] == "ok" and r["family"] == "ceiling":
            stream[(r["set"], r["dtype"], r.get("threads"))] = (
                r["bytes_per_param"] * r["params"] / r["b2b_s"]["median"] / 1e9)
        if r["status"] != "ok" or r["family"] not in PEER_FAMILIES:
            continue
        k = (r["set"], r["dtype"], r["config"], r.get("threads"))
        if k not in best or r["b2b_s"]["median"] < best[k]["b2b_s"]["median"]:
            best[k] = r
        if k not in best_lat or r["latency_s"]["median"] < best_lat[k]["latency_s"]["median"]:
            best_lat[k] = r
    for r in entries:
        if r["status"] != "ok":
            continue
        t = r["b2b_s"]["median"]
        moved = r["bytes_per_param"] * r["params"]
        r["gbps"] = moved / t / 1e9
        r["gbps_latency"] = moved / r["latency_s"]["median"] / 1e9
        r["pct_copy"] = 100.0 * r["gbps"] / copy
        ceiling = stream.get((r["set"], r["dtype"], r.get("threads")))
        r["pct_stream"] = None if ceiling is None else 100.0 * r["gbps"] / ceiling
        k = (r["set"], r["dtype"], r["config"], r.get("threads"))
        if k in best and r["family"] not in ("ceiling", "baseline", "plain"):
            r["speedup"] = best[k]["b2b_s"]["median"] / t
            r["speedup_vs"] = best[k]["contender"]
            r["speedup_latency"] = best_lat[k]["latency_s"]["median"] / r["latency_s"]["median"]
            r["speedup_latency_vs"] = best_lat[k]["contender"]
        else:
            r["speedup"] = r["speedup_latency"] = None
            r["speedup_vs"] = r["speedup_latency_vs"] = None
        # below fp32: against torch's fused fp32 AdamW, timed in the same rounds (else the
        # adamw entry of the same set and thread count)
        lowp = bool(results.get("configs", {}).get(r["config"], {}).get("storage"))
        base = baseline.get(k)
        source = "same rounds"
        if base is None and lowp:
            base, source = fp32_adamw.get((r["set"], r.get("threads"))), "adamw entry"
        if base is not None and r["family"] != "ceiling":
            r["vs_fp32"] = base["b2b_s"]["median"] / t
            r["vs_fp32_source"] = source
            # per round: the baseline's time / this one's (a speed ratio, as vs_fp32)
            r["vs_fp32_rounds"] = paired_ratio(base, r) if source == "same rounds" else None
        else:
            r["vs_fp32"] = r["vs_fp32_source"] = r["vs_fp32_rounds"] = None
        # ALLoRA: fastsched's step (not its CUDA graph) against its plain step (on the CPU
        # timed in the same rounds)
        ref = plain.get(k)
        mine = ref is not None and r["contender"] == "fastsched"
        r["vs_plain"] = ref["b2b_s"]["median"] / t if mine else None
        # per round: this step's time / the plain step's (a time ratio, as the target reads)
        r["plain_ratio_rounds"] = paired_ratio(r, ref) if mine else None
    return results


class _NoProgress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def start(self, total: int) -> None:
        pass

    def advance(self, text: str) -> None:
        pass


class _RichProgress(_NoProgress):
    def __init__(self):
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self._p = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                           TimeElapsedColumn(), console=Console(stderr=True), transient=True)
        self._task = None

    def __enter__(self):
        self._p.__enter__()
        return self

    def __exit__(self, *exc):
        return self._p.__exit__(*exc)

    def start(self, total: int) -> None:
        self._task = self._p.add_task("benchmark", total=total)

    def describe(self, text: str) -> None:
        self._p.update(self._task, description=text)

    def advance(self, text: str) -> None:
        self._p.update(self._task, advance=1, description=text)


class _LineProgress(_NoProgress):
    """One line per finished entry on stderr: for logs, where a live bar would not show."""

    def __init__(self):
        self.total, self.done = 0, 0

    def start(self, total: int) -> None:
        self.total = total

    def advance(self, text: str) -> None:
        self.done += 1
        print(f"[{self.done}/{self.total}] {text}", file=sys.stderr, flush=True)


def _entry_line(rec: dict[str, Any]) -> str:
    head = f"{rec['set']} {rec['dtype']} {rec['config']} {rec['contender']}"
    if rec.get("threads"):
        head += f" {rec['threads']}t"
    if rec["status"] != "ok":
        return f"{head}: {rec['status']} ({rec['reason']})"
    t = rec["b2b_s"]["median"]
    gbps = rec["bytes_per_param"] * rec["params"] / t / 1e9
    return f"{head}: {t * 1e3:.4g} ms/step, {gbps:.4g} GB/s"


def _progress(enabled: bool):
    if not enabled:
        return _NoProgress()
    if not sys.stderr.isatty():
        return _LineProgress()
    try:
        import rich  # noqa: F401
    except ImportError:
        return _LineProgress()
    return _RichProgress()


def _entries(opts: BenchOptions, cpu: bool) -> list[tuple[str, str]]:
    out = []
    for config in opts.configs:
        for c in contenders_for(config, None if opts.contenders is not None else cpu):
            if opts.contenders is None or c.key in opts.contenders:
                out.append((config, c.key))
    return out


def _for_dtype(entries: list[tuple[str, str]], dtype: str) -> list[tuple[str, str]]:
    """The entries whose configuration runs in ``dtype`` (bf16 + master: bf16 and fp16 only)."""
    return [(c, k) for c, k in entries if CONFIGS[c].allows(dtype)]


def check_dtypes(configs: list[str], dtypes: list[str]) -> None:
    """ValueError naming a configuration that runs in none of ``dtypes``."""
    for c in configs:
        cfg = CONFIGS[c]
        if not any(cfg.allows(d) for d in dtypes):
            raise ValueError(f"configuration {c!r} runs in {', '.join(cfg.dtypes or ())} "
                             f"parameters, none of the dtypes {', '.join(dtypes)}")


def cpu_threads(dev: Device, threads: int | None) -> int | None:
    """The torch thread count of ``fastsched profile``: one on the CPU unless told otherwise.

    The CPU run measures host-side cost on scaled tensors; on a small shared machine two
    intra-op threads competing with other processes made torch's fused AdamW 60x slower than
    one thread (GPT-2 at scale 0.01, 2 cores), so one thread is the stable default.
    """
    if threads is not None:
        return threads
    return None if dev.is_cuda else 1


@contextlib.contextmanager
def torch_threads(dev: Device, threads: int | None):
    """Run the block with :func:`cpu_threads` torch threads, restoring the count after."""
    n = cpu_threads(dev, threads)
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_bench(opts: BenchOptions, on_entry: Callable[[dict], None] | None = None,
              on_group: Callable[[dict], None] | None = None) -> dict[str, Any]:
    """Run the benchmark described by ``opts``; return the results (see :data:`SCHEMA`).

    ``on_entry(record)`` is called after each contender, ``on_group(results)`` after each
    (shape set, dtype) with the results so far (``meta["complete"]`` False until the end).
    """
    dev = Device(opts.device)
    # the objects alive now (torch, dynamo, ...) outlive the run: freezing them makes the
    # collection after each contender 0.3 s cheaper (measured on a 2-core CPU)
    try:
        importlib.import_module("torch._dynamo")  # what torch.optim imports on first use
    except Exception:  # noqa: BLE001 - a torch build without dynamo
        pass
    gc.freeze()
    before = torch.get_num_threads()
    try:
        return _run_bench(_default_lists(opts, dev), dev, on_entry, on_group)
    finally:
        torch.set_num_threads(before)
        gc.unfreeze()


def _run_bench(opts: BenchOptions, dev: Device, on_entry, on_group) -> dict[str, Any]:
    from ..schedules import Cosine

    scale = opts.scale if opts.scale is not None else (1.0 if dev.is_cuda else CPU_DEFAULT_SCALE)
    plan = TimingPlan.for_device(dev.is_cuda, opts.quick)
    compile_on = opts.compile if opts.compile is not None else dev.is_cuda
    budget = opts.compile_budget_s
    if budget is None:
        budget = 60.0 if opts.quick else 150.0
    gate = _CompileGate(compile_on, CPU_COMPILE_REASON if not dev.is_cuda else
                        "torch.compile switched off (--no-compile)",
                        budget, opts.compile_max_tensors)
    sets = _shape_sets(opts, scale)
    dtypes = opts.dtypes or ["fp32", "bf16"]
    check_dtypes(opts.configs, dtypes)
    counts = thread_counts(dev, opts.threads)
    interleave = not dev.is_cuda
    schedule = Cosine(1000, warmup_steps=100, min_ratio=0.1)
    copy_mib = opts.copy_mib or (1024 if dev.is_cuda else 64)
    meta = environment(dev, opts.argv)
    meter_method = MemoryMeter(dev).method
    entries = _entries(opts, not dev.is_cuda)
    results: dict[str, Any] = {
        "schema": SCHEMA,
        "meta": {**meta, "scale": scale, "quick": opts.quick, "seed": opts.seed,
                 "torch_threads": counts[0] if len(counts) == 1 and counts[0] else
                 torch.get_num_threads(),
                 "threads": counts, "cpu": _cpu_facts(dev), "complete": False,
                 "dtypes": dtypes, "configs": opts.configs,
                 "libraries": library_versions(), "fastsched_cpu_lowp": _cpu_lowp(),
                 "time_limit_s": opts.time_limit_s,
                 "compile": {"enabled": compile_on, "budget_s": budget,
                             "max_tensors": opts.compile_max_tensors},
                 "timing": {"plan": asdict(plan),
                            "b2b": "blocks of k steps, one synchronisation per block" +
                                   (" (CUDA events)" if dev.is_cuda else
                                    " (wall clock); the contenders of a configuration in "
                                    "interleaved rounds, one block each per round"),
                            "latency": "one step, synchronised before and after (wall clock)",
                            "l2_flush": False},
                 "peak_mem_method": meter_method,
                 "schedule": schedule.to_dict(),
                 "hyper": {"adamw": {**HYPER, "betas": list(HYPER["betas"])},
                           "sgd": SGD_HYPER, "clip_norm": CLIP_NORM}},
        "configs": {k: _config_record(c, dtypes) for k, c in CONFIGS.items()},
        "contenders": {k: {"title": c.title, "family": c.family, "graph": c.graph,
                           "description": c.description} for k, c in CONTENDERS.items()},
        "shape_sets": [{"name": s.name, "description": s.description, "params": s.params,
                        "tensors": s.tensors, "scale": s.scale,
                        "full_params": s.full.get("params", s.params),
                        "full_tensors": s.full.get("tensors", s.tensors)} for s in sets],
        "results": [],
    }
    started = time.perf_counter()
    results["_t0"] = started
    time_why = f"--time-limit {opts.time_limit_s or 0:g} s reached"

    def over_time() -> bool:
        return (opts.time_limit_s is not None
                and time.perf_counter() - started > opts.time_limit_s)

    with _progress(opts.progress) as prog:
        prog.start(len(counts) * len(sets) * sum(len(_for_dtype(entries, d)) for d in dtypes)
                   + 2)
        results["copy"] = copy_bandwidth(dev, copy_mib << 20, reps=20 if dev.is_cuda else 6)
        prog.advance(f"copy bandwidth: {results['copy']['gbps']:.4g} GB/s")
        for nt in counts:
            if nt is not None:
                torch.set_num_threads(nt)
            for dtype in dtypes:
                for sset in sets:
                    _run_group(sset, dtype, nt, entries, opts, dev, plan, schedule, gate,
                               interleave, over_time, time_why, results, prog, on_entry)
                    if on_group is not None:
                        on_group(results)
        results["copy_end"] = copy_bandwidth(dev, copy_mib << 20, reps=20 if dev.is_cuda else 6)
        prog.advance(f"copy bandwidth at the end: {results['copy_end']['gbps']:.4g} GB/s")
    results.pop("_t0", None)
    results["meta"]["wall_s"] = time.perf_counter() - started
    results["meta"]["complete"] = True
    return derive(results)


def _run_group(sset, dtype, nt, entries, opts, dev, plan, schedule, gate, interleave,
               over_time, time_why, results, prog, on_entry) -> None:
    """Every entry of one (shape set, dtype, thread count)."""
    def record(rec: dict) -> None:
        results["results"].append(rec)
        if on_entry is not None:
            on_entry(rec)
        prog.advance(_entry_line(rec))

    if over_time():
        for config, key in _for_dtype(entries, dtype):
            record(_skipped_entry(sset, dtype, config, key, time_why, nt))
        return
    entries = _for_dtype(entries, dtype)
    if not entries:
        return
    master = params_of(sset.shapes, DTYPES[dtype], dev.torch_device, opts.seed)
    shared: dict[str, Any] = {}
    if gate.enabled:
        _dynamo_reset()
    for config in dict.fromkeys(c for c, _ in entries):
        keys = [k for c, k in entries if c == config]
        if hasattr(prog, "describe"):
            prog.describe(f"{sset.name} {dtype} {config} {nt or ''}")
        if over_time():
            for key in keys:
                record(_skipped_entry(sset, dtype, config, key, time_why, nt))
            continue
        gate.time_left_s = (None if opts.time_limit_s is None else
                            opts.time_limit_s - (time.perf_counter() - results["_t0"]))
        if interleave:
            for rec in _run_interleaved(sset, dtype, config, keys, master, dev, plan, schedule,
                                        shared, gate, nt):
                record(rec)
            continue
        for key in keys:
            if over_time():
                record(_skipped_entry(sset, dtype, config, key, time_why, nt))
                continue
            record(_run_entry(sset, dtype, config, key, master, dev, plan, schedule, shared,
                              gate, nt))
    shared.clear()
    if gate.enabled:
        _dynamo_reset()  # compiled graphs may hold the parameters
    del master
    _free(dev)


def _config_record(c, dtypes: list[str]) -> dict[str, Any]:
    """A configuration in the results: bytes moved and held per parameter for every dtype
    (None where it does not run), for large tensors (entries have their shape set's)."""
    shown = next((d for d in dtypes if c.allows(d)), (c.dtypes or ("fp32",))[0])
    return {"title": c.title, "description": c.description,
            "bytes_note": c.note_for(DTYPES[shown]),
            "bytes_notes": {d: c.note_for(DTYPES[d]) for d in DTYPES if c.allows(d)},
            "dtypes": list(c.dtypes) if c.dtypes else None,
            "storage": asdict(c.storage) if c.storage else None,
            "bytes_per_param": {d: c.bytes_per_param(DTYPES[d]) for d in DTYPES},
            "state_bytes_per_param": {d: c.state_bytes_per_param(DTYPES[d]) for d in DTYPES}}


def _cpu_lowp() -> bool | None:
    """Whether the compiled CPU executor runs the options below fp32 (``SUPPORTS_LOWP``);
    None where it is not built."""
    try:
        from ..optim import _cpu

        return bool(getattr(_cpu, "SUPPORTS_LOWP", False)) if _cpu.available() else None
    except Exception:  # noqa: BLE001
        return None


def _cpu_facts(dev: Device) -> dict[str, Any] | None:
    """Cores and last-level cache of this CPU (from /sys), for the report."""
    if dev.is_cuda:
        return None
    import glob
    import os

    llc = None
    for d in sorted(glob.glob("/sys/devices/system/cpu/cpu0/cache/index*")):
        try:
            level = int(Path(d, "level").read_text())
            size = Path(d, "size").read_text().strip()
        except (OSError, ValueError):
            continue
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(size[-1:], 1)
        num = int(size.rstrip("KMG")) * mult
        if llc is None or level >= llc[0]:
            llc = (level, num)
    # the vectors each side was built for or dispatches to: an AVX2 build of the extension
    # ("avx2", FASTSCHED_CPU_ARCH=x86-64-v3) on an AVX-512 machine is timed against torch
    # with ATEN_CPU_CAPABILITY=avx2 (torch's own kernels pick their vectors at run time)
    from ..optim import _cpu

    ext = _cpu.ext() if _cpu.available() else None

    def built(name):  # (None: no extension, or one built before it had the function)
        f = getattr(ext, name, None)
        return f() if f is not None else None

    # without OpenMP (a compiler without it) the extension runs one thread whatever the
    # thread count: its 2-thread rows are then 1-thread times
    return {"cores": os.cpu_count(), "llc_level": llc[0] if llc else None,
            "llc_bytes": llc[1] if llc else None,
            "cpu_ext_simd": built("simd"), "cpu_ext_openmp": built("openmp"),
            "cpu_ext_half": built("half"),
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability()}


def _dynamo_reset() -> None:
    # each shape set compiles a new graph for AdamW.step; without a reset the recompile limit
    # (8 per code object) would silently send later sets back to eager
    try:
        import torch._dynamo

        torch._dynamo.reset()
    except Exception:  # noqa: BLE001 - nothing compiled yet, or no dynamo in this build
        pass


def results_stem(results: dict[str, Any]) -> str:
    meta = results["meta"]
    date = meta["date"][:19].replace("-", "").replace(":", "").replace("T", "-")
    return f"bench-{meta['device_kind']}-{slug(meta['device'])}-{date}"


def save_json(results: dict[str, Any], out: Path) -> Path:
    """Write ``<stem>.json`` (also for partial results: derived numbers are filled first)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{results_stem(results)}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(derive(results), indent=1, default=_json_default) + "\n")
    tmp.replace(path)
    return path


def save_results(results: dict[str, Any], out: Path, plot: bool = True) -> dict[str, Path]:
    """Write ``<stem>.json``, ``<stem>.md`` and (with matplotlib) ``<stem>.png`` under ``out``."""
    from .report import plot_results, render_markdown

    stem = results_stem(results)
    paths = {"json": save_json(results, out), "md": out / f"{stem}.md"}
    paths["md"].write_text(render_markdown(results, image=f"{stem}.png" if plot else None))
    if plot:
        png = out / f"{stem}.png"
        if plot_results(results, png):
            paths["png"] = png
        else:
            md = paths["md"].read_text().replace(f"![results]({stem}.png)\n", "")
            paths["md"].write_text(md)
    return paths


def _json_default(o):
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, float) and not math.isfinite(o):
        return None
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def load_results(path: Path) -> dict[str, Any]:
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise ValueError(f"{path} is not a fastsched bench results file (schema {SCHEMA})")
    return data

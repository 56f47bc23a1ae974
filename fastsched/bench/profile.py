"""``fastsched profile``: N optimizer steps under torch.profiler, summarised.

Per kernel (CUDA) or per operator (CPU, host-side; the compiled CPU backend's passes are the
``fastsched::<pass>`` ranges it records under a profiler): time per step, calls per step and,
where the bytes a kernel must move are known, achieved GB/s against the copy bandwidth measured
in the same run; launches per step; host time per step; host synchronisations inside the steps
(``cudaStreamSynchronize``, ``cudaDeviceSynchronize``, ``cudaEventSynchronize``,
``aten::item``, ``aten::_local_scalar_dense``); a Chrome trace of the profiled steps.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .contenders import CONFIGS, CONTENDERS, Setup, params_of
from .device import Device, copy_bandwidth, environment, quantiles, slug
from .harness import CPU_DEFAULT_SCALE, DTYPES, torch_threads
from .shapes import ShapeSet, get_shape_set

__all__ = ["ProfileOptions", "run_profile", "load_model_params", "ModelSpecError",
           "print_profile", "STEP_MARK"]

STEP_MARK = "fastsched.bench::step"
SYNC_NAMES = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize",
              "aten::item", "aten::_local_scalar_dense")
LAUNCH_NAMES = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx",
                "cudaGraphLaunch", "cudaLaunchCooperativeKernel")
#: kernels whose bytes are known: (pattern, elements of parameter size moved per call family;
#: None: the configuration's update pass)
KNOWN_BYTES = (
    (re.compile(r"_update_kernel|_units_update_kernel|fused_adam|FusedAdam|fused_sgd|FusedSgd"
                r"|_fused_adamw?_|_fused_sgd_"), None),
    (re.compile(r"_grad_stats_kernel|LpNormFunctor|_foreach_norm"), 1),
    # the compiled CPU backend's passes (fastsched.optim._cpu.PASS_RANGES): the update pass
    # moves the configuration's bytes, the statistics pass reads g once, unit sums read p once
    (re.compile(r"^fastsched::update$"), None),
    (re.compile(r"^fastsched::(grad_stats|unit_sums)$"), 1),
)
#: profiler ranges that stand for CPU kernels (operators run by no aten op)
CPU_PASS_PREFIX = "fastsched::"
_UPDATE_ELEMENTS = {"adamw": 7, "adamw-clip": 7, "allora": 7, "sgd": 5}


class ModelSpecError(ValueError):
    """``--model`` does not name an importable callable returning what is expected."""


_EXPECTED = "expected module:callable returning (model, loss_fn) or an iterable of parameters"


def load_model_params(spec: str, seed: int = 0) -> tuple[list[torch.Tensor], str]:
    """Parameters (with gradients) from ``module:callable``.

    The callable returns ``(model, loss_fn)``, where ``loss_fn(model)`` returns a scalar loss
    (one backward pass fills the gradients), or an iterable of parameter tensors (gradients are
    filled with fixed random values where missing).
    """
    mod_name, sep, attr = spec.partition(":")
    if not sep or not mod_name or not attr:
        raise ModelSpecError(f"{spec!r} is not module:callable; {_EXPECTED}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj: Any = importlib.import_module(mod_name)
    except Exception as e:  # noqa: BLE001 - any import failure is the user's module's
        raise ModelSpecError(f"cannot import {mod_name!r} ({type(e).__name__}: {e}); "
                             f"{_EXPECTED}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ModelSpecError(f"{mod_name!r} has no attribute {attr!r}; {_EXPECTED}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ModelSpecError(f"{spec} is a {type(obj).__name__}, not a callable; {_EXPECTED}")
    try:
        out = obj()
    except Exception as e:  # noqa: BLE001
        raise ModelSpecError(f"{spec}() raised {type(e).__name__}: {e}; {_EXPECTED}") from None
    if isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], torch.nn.Module):
        model, loss_fn = out
        if not callable(loss_fn):
            raise ModelSpecError(f"{spec}() returned (model, {type(loss_fn).__name__}): the "
                                 f"second item is not callable; {_EXPECTED}")
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ModelSpecError(f"{spec}() returned a model without trainable parameters")
        try:
            loss = loss_fn(model)
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise TypeError(f"loss_fn(model) returned {type(loss).__name__}, not a scalar "
                                "tensor")
            loss.backward()
        except Exception as e:  # noqa: BLE001
            raise ModelSpecError(f"loss_fn(model) failed ({type(e).__name__}: {e}); "
                                 f"{_EXPECTED}") from None
        how = f"{type(model).__name__} from {spec}, gradients from one backward of loss_fn"
    else:
        if isinstance(out, torch.Tensor) or isinstance(out, torch.nn.Module) or \
                not hasattr(out, "__iter__"):
            raise ModelSpecError(f"{spec}() returned {type(out).__name__}; {_EXPECTED}")
        params = list(out)
        bad = [type(p).__name__ for p in params if not isinstance(p, torch.Tensor)
               or not p.is_floating_point()]
        if not params or bad:
            raise ModelSpecError(f"{spec}() returned an iterable with "
                                 f"{'no items' if not params else bad[0] + ' items'}; "
                                 f"{_EXPECTED}")
        how = f"{len(params)} parameters from {spec}"
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        if p.grad is None:
            p.grad = (torch.randn(p.shape, generator=gen) * 1e-2).to(p.device, p.dtype)
    return params, how


@dataclass
class ProfileOptions:
    set: str | None = "gpt2"
    custom: ShapeSet | None = None
    model: str | None = None
    dtype: str = "fp32"
    config: str = "adamw"
    contender: str = "fastsched"
    steps: int = 10
    warmup: int = 3
    scale: float | None = None
    device: str | None = None
    out: Path | None = Path("bench/results")
    top: int = 15
    seed: int = 0
    threads: int | None = None
    argv: list[str] | None = field(default=None)


def _bytes_per_step(params: list[torch.Tensor], elements: int) -> int:
    return sum(p.numel() * p.element_size() * elements for p in params)


def _within(t: float, ranges: list[tuple[float, float]]) -> bool:
    return any(a <= t <= b for a, b in ranges)


def _update_bytes(params: list[torch.Tensor], config: str) -> int:
    """Bytes of one step's update pass: the configuration's elements per parameter, or (below
    fp32) the bytes its storage moves for these tensors."""
    if config in _UPDATE_ELEMENTS:
        return _bytes_per_step(params, _UPDATE_ELEMENTS[config])
    cfg = CONFIGS[config]
    return round(cfg.bytes_per_param(params[0].dtype, [p.shape for p in params])
                 * sum(p.numel() for p in params))


def _analyse(prof, dev: Device, n: int, params, config: str, copy_gbps: float,
             top: int) -> dict[str, Any]:
    from torch.autograd import DeviceType

    events = list(prof.events())
    # on a GPU the annotation also appears on the device timeline: the host one marks the step
    ranges = [(e.time_range.start, e.time_range.end) for e in events
              if e.name == STEP_MARK and getattr(e, "device_type", DeviceType.CPU)
              == DeviceType.CPU]
    host = [(b - a) / 1e6 for a, b in ranges]
    syncs = {name: 0 for name in SYNC_NAMES}
    launches = 0
    top_ops = 0
    kernels: dict[str, dict[str, float]] = {}
    for e in events:
        if e.name == STEP_MARK:
            continue
        on_device = getattr(e, "device_type", DeviceType.CPU) != DeviceType.CPU
        if on_device:
            k = kernels.setdefault(e.name, {"time_s": 0.0, "calls": 0})
            k["time_s"] += e.time_range.elapsed_us() / 1e6
            k["calls"] += 1
            continue
        if not _within(e.time_range.start, ranges):
            continue
        if e.name in syncs:
            syncs[e.name] += 1
        if e.name in LAUNCH_NAMES:
            launches += 1
        parent = e.cpu_parent
        if e.name.startswith("aten::") and (parent is None or parent.name == STEP_MARK
                                            or not parent.name.startswith("aten::")):
            top_ops += 1
        if not dev.is_cuda and (e.name.startswith("aten::")
                                or e.name.startswith(CPU_PASS_PREFIX)):
            k = kernels.setdefault(e.name, {"time_s": 0.0, "calls": 0})
            k["time_s"] += e.self_cpu_time_total / 1e6
            k["calls"] += 1
    update_bytes = _update_bytes(params, config)
    total = sum(k["time_s"] for k in kernels.values())
    rows = []
    for name, k in sorted(kernels.items(), key=lambda kv: -kv[1]["time_s"]):
        per_step = k["time_s"] / n
        elems = next(((0 if el is None else el) for pat, el in KNOWN_BYTES
                      if pat.search(name)), None)
        row = {"name": name, "calls_per_step": k["calls"] / n, "time_per_step_s": per_step,
               "share": k["time_s"] / total if total else 0.0, "bytes_per_step": None, "gbps": None,
               "pct_copy": None}
        if elems is not None and per_step > 0:
            b = update_bytes if elems == 0 else _bytes_per_step(params, elems)
            row.update(bytes_per_step=b, gbps=b / per_step / 1e9,
                       pct_copy=100.0 * b / per_step / 1e9 / copy_gbps)
        rows.append(row)
    # a device synchronisation is a cuda*Synchronize call; a tensor value read on the host
    # (item -> _local_scalar_dense) is one only when the tensor lives on the GPU
    sync_total = sum(syncs[s] for s in SYNC_NAMES[:3])
    return {
        "steps": n,
        "host_time_per_step_profiled_s": quantiles(host) if host else None,
        "device_time_per_step_s": total / n if dev.is_cuda else None,
        "kernel_time_per_step_s": total / n,
        "launches_per_step": (launches / n) if dev.is_cuda else None,
        "operator_calls_per_step": top_ops / n,
        "syncs_per_step": sync_total / n,
        "scalar_reads_per_step": syncs["aten::_local_scalar_dense"] / n,
        "sync_events": syncs,
        "kernels": rows[:max(top, 1)] if top else rows,
        "kernels_total": len(rows),
    }


def run_profile(opts: ProfileOptions) -> dict[str, Any]:
    dev = Device(opts.device)
    with torch_threads(dev, opts.threads):
        return _run_profile(opts, dev)


def _run_profile(opts: ProfileOptions, dev: Device) -> dict[str, Any]:
    from ..schedules import Cosine

    cfg = CONFIGS[opts.config]
    if opts.model is not None:
        params, source = load_model_params(opts.model, opts.seed)
        dev = Device(str(params[0].device))
        what = {"model": opts.model, "source": source}
    else:
        scale = opts.scale if opts.scale is not None else (1.0 if dev.is_cuda
                                                           else CPU_DEFAULT_SCALE)
        sset = (opts.custom if opts.custom is not None else get_shape_set(opts.set))
        sset = sset.scaled(scale)
        mp, mg = params_of(sset.shapes, DTYPES[opts.dtype], dev.torch_device, opts.seed)
        params = [torch.nn.Parameter(p) for p in mp]
        for p, g in zip(params, mg):
            p.grad = g
        what = {"set": sset.name, "scale": scale, "description": sset.description}
    if not cfg.allows(params[0].dtype):
        raise ValueError(f"configuration {opts.config!r} runs in {', '.join(cfg.dtypes or ())} "
                         f"parameters, not {params[0].dtype} (--dtype)")
    n_params = sum(p.numel() for p in params)
    copy = copy_bandwidth(dev, (256 if dev.is_cuda else 64) << 20, reps=10 if dev.is_cuda else 5)
    cont = CONTENDERS[opts.contender]
    schedule = Cosine(1000, warmup_steps=100, min_ratio=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        built = cont.build(Setup(params, dev, params[0].dtype, cfg, schedule, {}))
        built.step()
        dev.sync()
        first_s = time.perf_counter() - t0
        for _ in range(opts.warmup):
            built.step()
        dev.sync()
        # host time of the call itself (no synchronisation) and of a synchronised step
        host, lat = [], []
        for _ in range(opts.steps):
            t = time.perf_counter()
            built.step()
            host.append(time.perf_counter() - t)
            dev.sync()
        for _ in range(opts.steps):
            lat.append(dev.time_single(built.step))
        acts = [torch.profiler.ProfilerActivity.CPU]
        if dev.is_cuda:
            acts.append(torch.profiler.ProfilerActivity.CUDA)
        dev.sync()
        with torch.profiler.profile(activities=acts) as prof:
            for _ in range(opts.steps):
                with torch.profiler.record_function(STEP_MARK):
                    built.step()
            dev.sync()
    summary = _analyse(prof, dev, opts.steps, params, opts.config, copy["gbps"], opts.top)
    env = environment(dev, opts.argv)
    result = {
        "schema": "fastsched-profile/1",
        "meta": {**env, "torch_threads": torch.get_num_threads()},
        "what": {**what, "params": n_params, "tensors": len(params),
                 "dtypes": sorted({str(p.dtype).replace("torch.", "") for p in params}),
                 "config": opts.config, "config_title": cfg.title,
                 "contender": opts.contender, "contender_title": cont.title},
        "copy": copy,
        "first_step_s": first_s,
        "host_time_per_step_s": quantiles(host),
        "latency_s": quantiles(lat),
        "bytes_per_step": (_bytes_per_step(params, cfg.elements) if cfg.storage is None
                           else _update_bytes(params, opts.config)),
        **summary,
    }
    if opts.out is not None:
        opts.out.mkdir(parents=True, exist_ok=True)
        date = env["date"][:19].replace("-", "").replace(":", "").replace("T", "-")
        stem = f"profile-{env['device_kind']}-{slug(env['device'])}-{date}"
        trace = opts.out / f"{stem}.trace.json"
        prof.export_chrome_trace(str(trace))
        result["trace"] = str(trace)
        result["summary"] = str(opts.out / f"{stem}.json")
        Path(result["summary"]).write_text(json.dumps(result, indent=1) + "\n")
    return result


def print_profile(res: dict[str, Any], file=None) -> None:
    from .report import fmt_time

    out = file or sys.stdout
    w = res["what"]
    lines = [
        f"profile: {w['contender_title']} / {w['config_title']} on {res['meta']['device']}: "
        f"{w.get('set') or w.get('model')}, {w['params']} params in {w['tensors']} tensors "
        f"({', '.join(w['dtypes'])}), {res['steps']} steps",
        f"copy bandwidth (the ceiling): {res['copy']['gbps']:.4g} GB/s",
        f"first step (state, tables, JIT or torch.compile): {fmt_time(res['first_step_s'])}",
        f"host time per step (the call, no sync): {fmt_time(res['host_time_per_step_s']['median'])}"
        f"; synchronised step: {fmt_time(res['latency_s']['median'])}",
        ("device kernel time per step: " if res["device_time_per_step_s"] is not None else
         "host operator self time per step: ") + fmt_time(res["kernel_time_per_step_s"]),
        ("launches per step: " + (f"{res['launches_per_step']:.1f}"
                                  if res["launches_per_step"] is not None else "- (CPU)")
         + f"; operator calls per step: {res['operator_calls_per_step']:.1f}"),
        f"host synchronisations per step (cuda*Synchronize): {res['syncs_per_step']:.2f}; "
        f"tensor values read on the host per step (aten::_local_scalar_dense, a "
        f"synchronisation when the tensor is on a GPU): {res['scalar_reads_per_step']:.2f}",
    ]
    if any(res["sync_events"].values()):
        lines.append("  events in the profiled steps: " + ", ".join(
            f"{k} {v}" for k, v in res["sync_events"].items() if v))
    for line in lines:
        print(line, file=out)
    rows = res["kernels"]
    head = ("kernel" if res["device_time_per_step_s"] is not None else "operator (host)")
    print(f"\n{'time/step':>10} {'share':>6} {'calls':>6} {'GB/s':>8} {'% copy':>7}  {head}",
          file=out)
    for r in rows:
        gb = f"{r['gbps']:.4g}" if r["gbps"] is not None else "-"
        pc = f"{r['pct_copy']:.1f}" if r["pct_copy"] is not None else "-"
        name = r["name"] if len(r["name"]) <= 100 else r["name"][:97] + "..."
        print(f"{fmt_time(r['time_per_step_s']):>10} {100 * r['share']:5.1f}% "
              f"{r['calls_per_step']:6.1f} {gb:>8} {pc:>7}  {name}", file=out)
    if res.get("trace"):
        print(f"\nChrome trace: {res['trace']}\nsummary: {res['summary']}", file=out)

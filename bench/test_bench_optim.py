"""Host-side costs that run anywhere: building the optimizer's tables, the reference step.

    pytest bench/ --benchmark-only                  # all
    pytest bench/ --benchmark-only -k table         # table building only

Shapes are the real models' tensor lists with every tensor shrunk (tensor counts kept): table
building costs per tensor, not per element. The GPU harness is ``fastsched bench``.
"""

from __future__ import annotations

import pytest
import torch

import fastsched
from fastsched.bench.contenders import (
    ALLORA_ETA,
    CLIP_NORM,
    CONFIGS,
    HYPER,
    LOWP_CONFIGS,
    params_of,
)
from fastsched.bench.shapes import SHAPE_SETS
from fastsched.schedules import Cosine

SCHEDULE = Cosine(1000, warmup_steps=100, min_ratio=0.1)


def _params(set_name: str, scale: float, dtype=torch.float32):
    sset = SHAPE_SETS[set_name].scaled(scale)
    mp, mg = params_of(sset.shapes, dtype, torch.device("cpu"))
    params = [torch.nn.Parameter(p) for p in mp]
    for p, g in zip(params, mg):
        p.grad = g
    return params


def _fastsched(params, config: str, backend: str):
    if config == "adamw-clip":
        return fastsched.AdamW(params, **HYPER, schedule=SCHEDULE, backend=backend,
                               max_grad_norm=CLIP_NORM, stats=True)
    if config == "allora":
        return fastsched.AdamW([{"params": params, "allora_eta": ALLORA_ETA,
                                 "allora_unit": "row"}], **HYPER, schedule=SCHEDULE,
                               backend=backend)
    return fastsched.AdamW(params, **HYPER, schedule=SCHEDULE, backend=backend)


def _rebuild(opt):
    """Drop the cached tables so that the next ``_prepare`` builds them again."""
    for name in ("_plan", "_last_seen"):
        if hasattr(opt, name):
            setattr(opt, name, None)
    return opt._prepare()


@pytest.mark.parametrize("config", ["adamw", "adamw-clip", "allora"])
@pytest.mark.parametrize("set_name", ["gpt2", "lora-7b", "many-small"])
def test_table_build(benchmark, set_name, config):
    """Block and pointer tables of the Triton backend (built on the host, once per parameter
    set): the first-step cost that the cache saves on later steps."""
    opt = _fastsched(_params(set_name, 1e-3), config, backend="triton")
    if not hasattr(opt, "_prepare") or not hasattr(opt, "_refresh_groups"):
        pytest.skip("this fastsched has no _prepare/_refresh_groups to time")
    benchmark.group = f"table build: {set_name}"
    opt._refresh_groups(opt._device)
    plan = benchmark(_rebuild, opt)
    assert plan is not None


@pytest.mark.parametrize("set_name", ["gpt2", "many-small"])
def test_prepare_cached(benchmark, set_name):
    """The per-step host cost of finding the cached tables (parameters and grads unchanged)."""
    opt = _fastsched(_params(set_name, 1e-3), "adamw", backend="triton")
    if not hasattr(opt, "_prepare") or not hasattr(opt, "_refresh_groups"):
        pytest.skip("this fastsched has no _prepare/_refresh_groups to time")
    benchmark.group = f"cached tables: {set_name}"
    opt._refresh_groups(opt._device)
    opt._prepare()
    assert benchmark(opt._prepare) is not None


@pytest.mark.parametrize("config", ["adamw", "adamw-clip", "allora"])
def test_reference_step(benchmark, config):
    """One step of the PyTorch reference backend (the CPU path) on GPT-2 small at 1% size."""
    opt = _fastsched(_params("gpt2", 0.01), config, backend="reference")
    benchmark.group = "step: gpt2 at scale 0.01"
    opt.step()
    benchmark(opt.step)


@pytest.mark.parametrize("impl", ["forloop", "foreach", "fused"])
def test_torch_step(benchmark, impl):
    """torch.optim.AdamW on the same tensors, for comparison with the reference step."""
    flags = {"forloop": {"foreach": False}, "foreach": {"foreach": True},
             "fused": {"fused": True}}[impl]
    opt = torch.optim.AdamW(_params("gpt2", 0.01), **HYPER, **flags)
    benchmark.group = "step: gpt2 at scale 0.01"
    opt.step()
    benchmark(opt.step)


@pytest.mark.parametrize("set_name", ["gpt2", "many-small"])
def test_reference_step_bf16(benchmark, set_name):
    """The reference step in bf16: per-tensor host cost dominates on many small tensors."""
    opt = _fastsched(_params(set_name, 1e-3, torch.bfloat16), "adamw", backend="reference")
    benchmark.group = f"step bf16: {set_name} at scale 0.001"
    opt.step()
    benchmark(opt.step)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("config", LOWP_CONFIGS)
def test_lowp_step(benchmark, config, backend):
    """A step below fp32 (``fastsched bench --lowp``'s configurations, fp32 parameters where the
    configuration allows them, else bf16) on GPT-2 small at 1% size, per backend."""
    from fastsched.optim import _cpu

    if backend == "cpu" and not (_cpu.available() and getattr(_cpu, "SUPPORTS_LOWP", False)):
        pytest.skip("the compiled CPU backend does not run the options below fp32 here")
    cfg = CONFIGS[config]
    dtype = torch.float32 if cfg.allows(torch.float32) else torch.bfloat16
    opt = fastsched.AdamW(_params("gpt2", 0.01, dtype), **HYPER, schedule=SCHEDULE,
                          backend=backend, **cfg.storage.options())
    benchmark.group = f"step below fp32: gpt2 at scale 0.01, {backend}"
    opt.step()
    benchmark(opt.step)

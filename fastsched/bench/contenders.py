"""Optimizer configurations and the contenders that implement each one.

A *configuration* is the work one training step asks of the optimizer (AdamW; clipping + AdamW +
a learning-rate schedule; ALLoRA + AdamW; SGD with momentum) with the minimal bytes per parameter
that work must move. A *contender* is one way to do it: torch's for-loop, foreach, fused and
compiled implementations, with or without a CUDA graph, and fastsched. Every contender of a
configuration gets its own clone of the same parameters and gradients.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .device import Device

__all__ = ["Config", "Contender", "CONFIGS", "CONTENDERS", "Built", "Setup", "Unavailable",
           "Skipped", "contenders_for", "HYPER", "CLIP_NORM", "ALLORA_ETA", "CPU_CONTENDERS"]

#: hyperparameters shared by every contender
HYPER = {"lr": 1e-3, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1}
SGD_HYPER = {"lr": 1e-2, "momentum": 0.9}
CLIP_NORM = 1.0
ALLORA_ETA = 1.0


class Unavailable(Exception):
    """The installed fastsched (or torch) does not offer what this contender needs."""


class Skipped(Exception):
    """The contender is left out of this run, for the reason given."""


@dataclass(frozen=True)
class Config:
    key: str
    title: str
    #: elements of parameter size read plus written by the minimal one-pass step
    elements: int
    bytes_note: str
    description: str

    def bytes_per_param(self, dtype: torch.dtype) -> int:
        return self.elements * torch.empty((), dtype=dtype).element_size()


CONFIGS: dict[str, Config] = {c.key: c for c in (
    Config("adamw", "AdamW", 7, "read p, g, m, v; write p, m, v",
           "torch: the optimizer step alone at a constant lr; fastsched: the same step with a "
           "cosine schedule evaluated on the device"),
    Config("adamw-clip", "clip + AdamW + schedule", 8,
           "one more read of g for the global norm before any update",
           "torch: clip_grad_norm_(max_norm=1) + step + LambdaLR(cosine).step(); fastsched: "
           "AdamW(max_grad_norm=1, stats=True): global-norm clipping, gradient statistics, "
           "non-finite skip guard and the cosine schedule, all on the device"),
    Config("allora", "ALLoRA + AdamW", 7,
           "row norms reduced inside the update pass (a program owns whole rows)",
           "per-row gradient scaling g_row / sqrt(|theta_row|^2 + 1/eta^2), eta = 1, before "
           "AdamW; torch: eager per-row norms and scaling + fused AdamW; fastsched: parameter "
           "group options allora_eta=1, allora_unit='row', with the cosine schedule"),
    Config("sgd", "SGD + momentum", 5, "read p, g, buf; write p, buf",
           "SGD with momentum 0.9; torch at a constant lr, fastsched with the cosine schedule"),
)}

DEFAULT_CONFIGS = ("adamw", "adamw-clip", "allora")


@dataclass
class Setup:
    """What a contender is built from: its own parameters (gradients set) and the run's facts."""

    params: list[torch.Tensor]
    dev: Device
    dtype: torch.dtype
    config: Config
    schedule: Any
    shared: dict[str, Any]


@dataclass
class Built:
    """A ready contender: ``step()`` runs one optimizer step (or replays its graph)."""

    step: Callable[[], None]
    info: dict[str, Any] = field(default_factory=dict)
    after_first: Callable[[], None] | None = None
    keep: Any = None  # objects that must live as long as the step (optimizer, graph, ...)


@dataclass(frozen=True)
class Contender:
    key: str
    title: str
    family: str  # "torch", "fastsched" or "ceiling" (a bandwidth reference, not an optimizer)
    build: Callable[[Setup], Built]
    graph: bool = False
    compiles: bool = False
    description: str = ""


# -- building blocks --------------------------------------------------------------------------

def _capture(body: Callable[[], None], dev: Device, warmup: int = 3) -> torch.cuda.CUDAGraph:
    """Warm ``body`` up on a side stream, then capture one call of it in a CUDA graph."""
    s = torch.cuda.Stream(device=dev.torch_device)
    s.wait_stream(torch.cuda.current_stream(dev.torch_device))
    with torch.cuda.stream(s):
        for _ in range(warmup):
            body()
    torch.cuda.current_stream(dev.torch_device).wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        body()
    return g


def _need_cuda(setup: Setup) -> None:
    if not setup.dev.is_cuda:
        raise Skipped("CUDA graphs need a CUDA device")


def _torch_opt(setup: Setup, impl: str, lr: float | torch.Tensor | None = None, **extra):
    flags = {"forloop": {"foreach": False, "fused": False}, "foreach": {"foreach": True},
             "fused": {"fused": True}}[impl]
    flags.update(extra)
    if setup.config.key == "sgd":
        return torch.optim.SGD(setup.params, lr=SGD_HYPER["lr"] if lr is None else lr,
                               momentum=SGD_HYPER["momentum"], **flags)
    h = dict(HYPER)
    if lr is not None:
        h["lr"] = lr
    return torch.optim.AdamW(setup.params, **h, **flags)


def _row_views(params: list[torch.Tensor]) -> list[torch.Tensor]:
    return [p.view(p.shape[0], -1) if p.dim() >= 2 else p.view(1, -1) for p in params]


def _allora_pre(params: list[torch.Tensor]) -> Callable[[], None]:
    """Eager ALLoRA scaling: p.grad = g0 * rsqrt(|row of p|^2 + 1/eta^2), per row, per tensor.

    Written out of place from the fixed gradients ``g0``, so repeated steps do not shrink them.
    """
    inv_eta2 = 1.0 / ALLORA_ETA ** 2
    views = _row_views(params)
    g0 = [p.grad.view(v.shape) for p, v in zip(params, views)]

    def pre() -> None:
        for p, v, g in zip(params, views, g0):
            n2 = v.float().square().sum(dim=1, keepdim=True)
            p.grad = (g * torch.rsqrt(n2 + inv_eta2).to(g.dtype)).view(p.shape)

    return pre


def _torch_body(setup: Setup, opt, with_clip: bool) -> Callable[[], None]:
    params = setup.params
    pre = _allora_pre(params) if setup.config.key == "allora" else None

    if with_clip:
        def body() -> None:
            torch.nn.utils.clip_grad_norm_(params, CLIP_NORM)
            opt.step()
    elif pre is not None:
        def body() -> None:
            pre()
            opt.step()
    else:
        body = opt.step
    return body


def _scheduler(setup: Setup, opt):
    return torch.optim.lr_scheduler.LambdaLR(opt, setup.schedule)


# -- torch contenders -------------------------------------------------------------------------

def _build_torch(impl: str) -> Callable[[Setup], Built]:
    def build(setup: Setup) -> Built:
        opt = _torch_opt(setup, impl)
        clip = setup.config.key == "adamw-clip"
        body = _torch_body(setup, opt, clip)
        if not clip:
            return Built(body, keep=opt)
        sched = _scheduler(setup, opt)

        def step() -> None:
            body()
            sched.step()

        return Built(step, keep=(opt, sched))

    return build


def _build_torch_graph(setup: Setup) -> Built:
    _need_cuda(setup)
    clip = setup.config.key == "adamw-clip"
    # a scheduler writes group["lr"] between replays: it must be a device tensor the graph reads
    lr0 = SGD_HYPER["lr"] if setup.config.key == "sgd" else HYPER["lr"]
    lr = torch.tensor(lr0, dtype=torch.float32, device=setup.dev.torch_device) if clip else None
    extra = {} if setup.config.key == "sgd" else {"capturable": True}
    opt = _torch_opt(setup, "fused", lr=lr, **extra)
    body = _torch_body(setup, opt, clip)
    sched = _scheduler(setup, opt) if clip else None
    graph = _capture(body, setup.dev)
    if sched is None:
        return Built(graph.replay, keep=(opt, graph))

    def step() -> None:
        graph.replay()
        sched.step()

    return Built(step, keep=(opt, graph, sched))


def _dynamo_graphs() -> int:
    """Graphs dynamo compiled so far; -1 where it has not counted any (or cannot)."""
    try:
        from torch._dynamo.utils import counters

        stats = counters["stats"]
        return int(stats["unique_graphs"]) if "unique_graphs" in stats else -1
    except Exception:  # noqa: BLE001 - private counters: absent means "cannot tell"
        return -1


def _build_compile(setup: Setup) -> Built:
    cache = setup.shared.get("compile")
    info: dict[str, Any] = {}
    after_first = None
    if cache is None:
        dev = setup.dev
        lr = torch.tensor(HYPER["lr"], dtype=torch.float32, device=dev.torch_device)
        # torch's recipe for a compiled optimizer with a scheduler: a tensor lr, so that
        # LambdaLR's updates do not recompile; capturable keeps the step on the device (CUDA)
        flags = {"foreach": True, "capturable": True} if dev.is_cuda else {}
        opt = torch.optim.AdamW(setup.params, **{**HYPER, "lr": lr}, **flags)
        sched = _scheduler(setup, opt)

        def opt_step() -> None:  # as in torch's "compiled optimizer with a scheduler" recipe
            opt.step()

        compiled = torch.compile(opt_step)
        graphs_before = _dynamo_graphs()
        cache = {"opt": opt, "sched": sched, "fn": compiled, "params": setup.params,
                 "entry": setup.config.key}

        def after_first() -> None:
            after = _dynamo_graphs()
            if graphs_before >= 0 and after >= 0 and after <= graphs_before:
                raise RuntimeError("torch.compile produced no graph (the step ran eagerly)")
            if after < 0:
                info["note"] = "could not confirm from dynamo's counters that a graph compiled"

        setup.shared["compile"] = cache
    else:
        info["note"] = (f"compiled step and optimizer state shared with the {cache['entry']} "
                        "entry; its compile time is repeated here, memory counts only what this "
                        "configuration adds")
        if "compile_s" in cache:
            info["compile_s"] = cache["compile_s"]
            info["compile_shared"] = True
    opt, sched, fn, params = cache["opt"], cache["sched"], cache["fn"], cache["params"]
    if setup.config.key == "adamw-clip":
        def step() -> None:
            torch.nn.utils.clip_grad_norm_(params, CLIP_NORM)
            fn()
            sched.step()
    else:
        step = fn
    return Built(step, info=info, after_first=after_first, keep=cache)


# -- fastsched contenders ---------------------------------------------------------------------

_ALLORA_PROBE: dict[str, tuple[bool, str]] = {}


def _allora_takes_effect(dev: Device) -> tuple[bool, str]:
    """Whether the group options allora_eta / allora_unit change a step (cached per device).

    Two AdamW steps with and without them on two small tensors whose rows have different norms;
    eps = 0.1 so that gradient scaling shows through Adam's normalisation. Unknown group keys are
    accepted silently by torch's Optimizer, so only the effect tells whether they are supported.
    """
    key = str(dev.torch_device)
    if key in _ALLORA_PROBE:
        return _ALLORA_PROBE[key]
    import fastsched

    base = [torch.linspace(-2.0, 3.0, 32).view(4, 8), torch.linspace(0.5, -1.0, 12).view(3, 4)]
    grads = [torch.linspace(1.0, -1.0, 32).view(4, 8), torch.full((3, 4), 0.5)]
    out = []
    for allora in (False, True):
        ps = [b.clone().to(dev.torch_device) for b in base]
        for p, g in zip(ps, grads):
            p.grad = g.clone().to(dev.torch_device)
        group: dict[str, Any] = {"params": ps}
        if allora:
            group.update(allora_eta=ALLORA_ETA, allora_unit="row")
        try:
            opt = fastsched.AdamW([group], lr=0.1, eps=0.1, weight_decay=0.0)
            opt.step()
            opt.step()
        except (TypeError, ValueError, KeyError) as e:
            _ALLORA_PROBE[key] = (False, f"{type(e).__name__}: {e}")
            return _ALLORA_PROBE[key]
        out.append([p.detach().cpu() for p in ps])
    if all(torch.equal(a, b) for a, b in zip(*out)):
        res = (False, "parameter group options allora_eta/allora_unit had no effect on the step "
                      "(not supported by this fastsched)")
    else:
        res = (True, "")
    _ALLORA_PROBE[key] = res
    return res


def _fastsched_opt(setup: Setup):
    import fastsched

    key = setup.config.key
    try:
        if key == "sgd":
            return fastsched.SGD(setup.params, lr=SGD_HYPER["lr"],
                                 momentum=SGD_HYPER["momentum"], schedule=setup.schedule)
        if key == "adamw-clip":
            return fastsched.AdamW(setup.params, **HYPER, schedule=setup.schedule,
                                   max_grad_norm=CLIP_NORM, stats=True)
        if key == "allora":
            ok, why = _allora_takes_effect(setup.dev)
            if not ok:
                raise Unavailable(why)
            group = {"params": setup.params, "allora_eta": ALLORA_ETA, "allora_unit": "row"}
            return fastsched.AdamW([group], **HYPER, schedule=setup.schedule)
        return fastsched.AdamW(setup.params, **HYPER, schedule=setup.schedule)
    except TypeError as e:
        # a keyword this fastsched does not know yet
        raise Unavailable(f"TypeError: {e}") from e


def _build_fastsched(setup: Setup) -> Built:
    opt = _fastsched_opt(setup)
    return Built(opt.step, info={"backend": opt.backend}, keep=opt)


def _build_fastsched_graph(setup: Setup) -> Built:
    _need_cuda(setup)
    opt = _fastsched_opt(setup)
    graph = _capture(opt.step, setup.dev)
    return Built(graph.replay, info={"backend": opt.backend}, keep=(opt, graph))


# -- the ceiling: the compiled CPU extension's stream kernel -------------------------------------

def _build_stream(setup: Setup) -> Built:
    """In place, AdamW's access pattern with no arithmetic: per 32-bit word 4 reads (p, g, m, v)
    and 3 writes (p, m, v); as many words as AdamW's parameters take bytes / 4 (a bf16 run
    streams half as many words), so it moves AdamW's bytes in the same run."""
    if setup.dev.is_cuda:
        raise Skipped("the stream ceiling is a kernel of the compiled CPU backend")
    from ..optim import _cpu

    if not _cpu.available():
        raise Unavailable(f"the compiled CPU backend is not available: {_cpu.reason()}")
    ext = _cpu.ext()
    nbytes = sum(p.numel() * p.element_size() for p in setup.params)
    n = max(1, nbytes // 4)
    bufs = [torch.zeros(n, dtype=torch.int32) for _ in range(4)]
    addrs = [b.data_ptr() for b in bufs]
    # the optimizer's own tensors are not needed: free what the harness gave it
    for p in setup.params:
        p.grad = None

    def step() -> None:
        ext.stream(*addrs, n, torch.get_num_threads())

    return Built(step, info={"words": n}, keep=bufs)


# -- the table --------------------------------------------------------------------------------

CONTENDERS: dict[str, Contender] = {c.key: c for c in (
    Contender("torch-forloop", "torch for-loop", "torch", _build_torch("forloop"),
              description="torch.optim, foreach=False: several kernels per tensor"),
    Contender("torch-foreach", "torch foreach", "torch", _build_torch("foreach"),
              description="torch.optim, foreach=True: one multi-tensor launch per op"),
    Contender("torch-fused", "torch fused", "torch", _build_torch("fused"),
              description="torch.optim, fused=True: one multi-tensor kernel for the math"),
    Contender("torch-fused-graph", "torch fused, CUDA graph", "torch", _build_torch_graph,
              graph=True, description="fused=True, capturable=True (device lr tensor when a "
              "scheduler runs), the step captured once and replayed; the scheduler runs "
              "between replays"),
    Contender("torch-compile", "torch.compile", "torch", _build_compile, compiles=True,
              description="torch.compile(opt.step) with a tensor lr (torch's recipe for "
              "schedulers without recompiling); clip_grad_norm_ and LambdaLR stay eager"),
    Contender("fastsched", "fastsched", "fastsched", _build_fastsched,
              description="fastsched optimizer (Triton on CUDA; on the CPU the compiled backend, "
              "or the PyTorch reference backend where the extension is not built)"),
    Contender("fastsched-graph", "fastsched, CUDA graph", "fastsched", _build_fastsched_graph,
              graph=True, description="the fastsched step captured once and replayed"),
    Contender("stream", "stream ceiling", "ceiling", _build_stream,
              description="CPU only: the compiled extension's in-place kernel with AdamW's "
              "access pattern (4 reads, 3 writes of each 32-bit word, no arithmetic) on "
              "AdamW's bytes: the bandwidth an AdamW step can reach on this machine"),
)}

#: the contenders of a CPU run unless --contenders says otherwise: torch's fastest CPU
#: implementation (fused), fastsched (the compiled CPU backend) and the stream ceiling
CPU_CONTENDERS = ("torch-fused", "fastsched", "stream")

_BY_CONFIG = {
    "adamw": ("torch-forloop", "torch-foreach", "torch-fused", "torch-fused-graph",
              "torch-compile", "fastsched", "fastsched-graph", "stream"),
    "adamw-clip": ("torch-forloop", "torch-foreach", "torch-fused", "torch-fused-graph",
                   "torch-compile", "fastsched", "fastsched-graph"),
    "allora": ("torch-fused", "torch-fused-graph", "fastsched", "fastsched-graph"),
    "sgd": ("torch-forloop", "torch-foreach", "torch-fused", "torch-fused-graph", "fastsched",
            "fastsched-graph"),
}


def contenders_for(config: str, cpu: bool | None = None) -> list[Contender]:
    """The contenders of ``config``: every one (``cpu`` None), those of a default CPU run
    (:data:`CPU_CONTENDERS`, ``cpu`` True) or of a default GPU run (all but the CPU ceiling)."""
    keys = _BY_CONFIG[config]
    if cpu is True:
        keys = tuple(k for k in keys if k in CPU_CONTENDERS)
    elif cpu is False:
        keys = tuple(k for k in keys if k != "stream")
    return [CONTENDERS[k] for k in keys]


def params_of(shapes, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """Master parameters and gradients: fixed random values, cloned for every contender."""
    gen = torch.Generator(device=device).manual_seed(seed)
    params, grads = [], []
    for s in shapes:
        p = torch.randn(s, generator=gen, device=device, dtype=torch.float32).mul_(0.02)
        g = torch.randn(s, generator=gen, device=device, dtype=torch.float32).mul_(1e-2)
        params.append(p.to(dtype))
        grads.append(g.to(dtype))
    return params, grads

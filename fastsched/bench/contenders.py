"""Optimizer configurations and the contenders that implement each one.

A *configuration* is the work one training step asks of the optimizer (AdamW; clipping + AdamW +
a learning-rate schedule; ALLoRA + AdamW; SGD with momentum; AdamW below fp32: bf16 weights with
an fp32 master or stochastic rounding, bf16 or 8-bit states) with the minimal bytes per parameter
that work must move. A *contender* is one way to do it: torch's for-loop, foreach, fused and
compiled implementations, with or without a CUDA graph, torchao's and bitsandbytes' low-precision
optimizers where they are installed, and fastsched. Every contender of a configuration gets its
own clone of the same parameters and gradients.

The configurations below fp32 (:data:`LOWP_CONFIGS`) carry a :class:`Storage`; their bytes per
parameter, moved by a step and held as state, are computed from it (:meth:`Config.bytes_per_param`,
:meth:`Config.state_bytes_per_param`) with fastsched's 8-bit constants (one float32 scale per
``Q_BLOCK`` elements, float32 states below ``MIN_8BIT_SIZE`` elements). The state a contender
holds is measured after its first step (:func:`state_nbytes`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .device import Device

__all__ = ["Config", "Storage", "Contender", "CONFIGS", "CONTENDERS", "Built", "Setup",
           "Unavailable", "Skipped", "contenders_for", "HYPER", "CLIP_NORM", "ALLORA_ETA",
           "CPU_CONTENDERS", "CPU_EXTRA", "LOWP_CONFIGS", "state_nbytes", "library_versions"]

#: hyperparameters shared by every contender
HYPER = {"lr": 1e-3, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1}
SGD_HYPER = {"lr": 1e-2, "momentum": 0.9}
CLIP_NORM = 1.0
ALLORA_ETA = 1.0


class Unavailable(Exception):
    """The installed fastsched (or torch) does not offer what this contender needs."""


class Skipped(Exception):
    """The contender is left out of this run, for the reason given."""


def _esize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


#: the benchmark's dtype names (as ``--dtypes`` spells them)
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _q8() -> tuple[int, int]:
    """(elements per 8-bit scale, smallest tensor with 8-bit states): fastsched's constants."""
    from ..kernels import layout as L
    from ..optim._lowp import MIN_8BIT_SIZE

    return L.Q_BLOCK, MIN_8BIT_SIZE


@dataclass(frozen=True)
class Storage:
    """How an AdamW configuration below fp32 stores weights and states (fastsched's options).

    ``states``: None (the weights' dtype: the master's float32 with ``master``, else the
    parameter's), ``"fp32"``, ``"bf16"`` or ``"8bit"`` (uint8 codes + one float32 scale per
    ``Q_BLOCK`` elements; tensors under ``MIN_8BIT_SIZE`` elements keep float32 states).
    """

    master: bool = False  # an fp32 master copy is the weight; the parameter is only written
    sr: bool = False  # bf16 parameter written with stochastic rounding
    states: str | None = None

    def options(self) -> dict[str, Any]:
        """fastsched's constructor keywords for this storage."""
        kw: dict[str, Any] = {}
        if self.master:
            kw["master_weights"] = True
        if self.sr:
            kw["stochastic_rounding"] = True
        if self.states is not None:
            kw["state_dtype"] = {"fp32": torch.float32, "bf16": torch.bfloat16,
                                 "8bit": "8bit"}[self.states]
        return kw

    def accesses(self, n_states: int) -> int:
        """Elements read plus written per parameter by the one-pass step, each of its own size
        (the parameter written, plus read without a master; the gradient; master; states)."""
        return (3 if self.master else 2) + 1 + 2 * n_states

    def _state_size(self, dtype: torch.dtype) -> int:
        if self.states is None:
            return 4 if self.master else _esize(dtype)
        return {"fp32": 4, "bf16": 2}[self.states]

    def tensor_bytes(self, dtype: torch.dtype, numel: int | None, n_states: int
                     ) -> tuple[float, float]:
        """(bytes moved by one step, bytes held as state) of a tensor of ``numel`` elements
        (None: per element of a large tensor)."""
        n = 1 if numel is None else numel
        p = _esize(dtype)
        moved = (p + 8 if self.master else 2 * p) + p  # parameter (+ master), gradient read
        held = 4 * n if self.master else 0
        moved *= n
        block, min8 = _q8()
        if self.states == "8bit" and (numel is None or numel >= min8):
            scales = 4 / block if numel is None else 4 * math.ceil(numel / block)
            held += n_states * (n + scales)
            moved += n_states * 2 * (n + scales)  # codes and scales, read and written
        else:
            s = 4 if self.states == "8bit" else self._state_size(dtype)
            held += n_states * s * n
            moved += n_states * 2 * s * n
        return moved, held

    def note(self, dtype: torch.dtype, n_states: int) -> str:
        p = DTYPE_NAMES.get(dtype, str(dtype))
        w = (f"write p ({p}), read + write the fp32 master" if self.master else
             f"read + write p ({p}{', stochastic rounding' if self.sr else ''})")
        names = "m, v" if n_states == 2 else "the state"
        if self.states == "8bit":
            block, min8 = _q8()
            st = (f"read + write {names} as 8-bit codes + one fp32 scale per {block} "
                  f"(fp32 below {min8} elements)")
        else:
            st = (f"read + write {names} "
                  f"({'fp32' if self.states is None and self.master else self.states or p})")
        return f"{w}; read g ({p}); {st}"


@dataclass(frozen=True)
class Config:
    key: str
    title: str
    #: elements of parameter size read plus written by the minimal one-pass step (a
    #: configuration with a ``storage``: elements of their own sizes, computed from it, as are
    #: its bytes)
    elements: int
    bytes_note: str
    description: str
    #: the parameter dtypes it runs in (None: every one)
    dtypes: tuple[str, ...] | None = None
    storage: Storage | None = None
    #: optimizer states per parameter element (Adam: exp_avg, exp_avg_sq; SGD: the momentum)
    n_states: int = 2

    def __post_init__(self) -> None:
        if self.storage is not None:
            object.__setattr__(self, "elements", self.storage.accesses(self.n_states))

    def allows(self, dtype: torch.dtype | str) -> bool:
        name = dtype if isinstance(dtype, str) else DTYPE_NAMES.get(dtype, str(dtype))
        return self.dtypes is None or name in self.dtypes

    def _bytes(self, dtype: torch.dtype, shapes: Sequence[Sequence[int]] | None, held: bool):
        if not self.allows(dtype):
            return None
        if self.storage is None:
            per = (self.n_states if held else self.elements) * _esize(dtype)
            return per
        if shapes is None:
            return _tidy(self.storage.tensor_bytes(dtype, None, self.n_states)[held])
        sizes = [math.prod(s) for s in shapes]
        total = sum(self.storage.tensor_bytes(dtype, n, self.n_states)[held] for n in sizes)
        return _tidy(total / max(1, sum(sizes)))

    def bytes_per_param(self, dtype: torch.dtype,
                        shapes: Sequence[Sequence[int]] | None = None) -> float | None:
        """Bytes read + written per parameter by the minimal one-pass step; exact for the
        tensors ``shapes`` (8-bit: small tensors keep fp32 states, scales round up), else
        for large tensors. None where the configuration does not run in ``dtype``."""
        return self._bytes(dtype, shapes, held=False)

    def state_bytes_per_param(self, dtype: torch.dtype,
                              shapes: Sequence[Sequence[int]] | None = None) -> float | None:
        """Bytes of optimizer state (and fp32 master) held per parameter, as for
        :meth:`bytes_per_param`."""
        return self._bytes(dtype, shapes, held=True)

    def note_for(self, dtype: torch.dtype) -> str:
        return self.bytes_note if self.storage is None else self.storage.note(dtype,
                                                                               self.n_states)


def _tidy(x: float) -> float | int:
    """An integral byte count as an int (28, not 28.0), else the float."""
    return int(x) if float(x).is_integer() else float(x)


_BASE_ADAMW = ("AdamW, constant lr for torch; fastsched with the cosine schedule evaluated on the "
               "device; torch's fused fp32 AdamW (fp32 copies of the parameters) runs beside "
               "every contender as the baseline of the 'vs fp32 AdamW' ratio")

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
           "SGD with momentum 0.9; torch at a constant lr, fastsched with the cosine schedule",
           n_states=1),
    # below fp32: bytes from the storage
    Config("adamw-master", "AdamW, bf16 + fp32 master", 0, "",
           "bf16 (or fp16) parameters and gradients, an fp32 master copy and fp32 states. "
           "fastsched: master_weights=True (the master in state['master_param']); torch: what "
           "apex / Transformer Engine do, fused fp32 AdamW on fp32 master copies (gradients "
           "copied into fp32 master gradients, the masters copied back into the parameters). "
           + _BASE_ADAMW, dtypes=("bf16", "fp16"), storage=Storage(master=True)),
    Config("adamw-sr", "AdamW, bf16 + stochastic rounding", 0, "",
           "bf16 parameters written with stochastic rounding, bf16 states. fastsched: "
           "stochastic_rounding=True; torchao: _AdamW(bf16_stochastic_round=True). "
           + _BASE_ADAMW, dtypes=("bf16",), storage=Storage(sr=True)),
    Config("adamw-bf16-states", "AdamW, bf16 states", 0, "",
           "states stored in bf16. fastsched: state_dtype=torch.bfloat16 (on fp32 parameters "
           "too); torch: fused AdamW, which keeps the states in the parameters' dtype (bf16 "
           "parameters only). " + _BASE_ADAMW, dtypes=("fp32", "bf16"),
           storage=Storage(states="bf16")),
    Config("adamw-8bit", "AdamW, 8-bit states", 0, "",
           "block-scaled 8-bit states. fastsched: state_dtype='8bit'; torchao: AdamW8bit; "
           "bitsandbytes: bnb.optim.AdamW8bit (both 256-element blocks with a dynamic "
           "quantisation map). " + _BASE_ADAMW, dtypes=("fp32", "bf16"),
           storage=Storage(states="8bit")),
    Config("adamw-sr-8bit", "AdamW, bf16 + SR + 8-bit states", 0, "",
           "bf16 parameters with stochastic rounding and 8-bit states. fastsched: "
           "stochastic_rounding=True, state_dtype='8bit'; torchao: "
           "AdamW8bit(bf16_stochastic_round=True). " + _BASE_ADAMW, dtypes=("bf16",),
           storage=Storage(sr=True, states="8bit")),
)}

DEFAULT_CONFIGS = ("adamw", "adamw-clip", "allora")
#: the configurations below fp32 (``fastsched bench --lowp``)
LOWP_CONFIGS = ("adamw-master", "adamw-sr", "adamw-bf16-states", "adamw-8bit", "adamw-sr-8bit")


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
    #: the per-parameter state dicts the optimizer holds (measured after the first step); None:
    #: ``keep``'s ``state`` when it is an optimizer, else not measured
    states: Callable[[], Iterable[dict]] | None = None


@dataclass(frozen=True)
class Contender:
    key: str
    title: str
    #: "torch", "library" (torchao, bitsandbytes), "fastsched", "baseline" (torch's fused fp32
    #: AdamW beside the configurations below fp32), "plain" (fastsched's plain AdamW beside its
    #: ALLoRA step) or "ceiling" (a bandwidth reference)
    family: str
    build: Callable[[Setup], Built]
    graph: bool = False
    compiles: bool = False
    description: str = ""
    #: the configuration (and dtype; None: the run's) whose bytes it moves whatever the
    #: configuration it is listed in (the baseline: "adamw" in fp32; the stream and the plain
    #: step: "adamw")
    fixed: tuple[str, torch.dtype | None] | None = None

    def _fixed(self, config: Config, dtype: torch.dtype) -> tuple[Config, torch.dtype]:
        if self.fixed is None:
            return config, dtype
        return CONFIGS[self.fixed[0]], self.fixed[1] or dtype

    def bytes_per_param(self, config: Config, dtype: torch.dtype, shapes=None):
        """The bytes its GB/s is computed at: its configuration's (the baseline's own)."""
        cfg, dt = self._fixed(config, dtype)
        return cfg.bytes_per_param(dt, shapes)

    def state_formula(self, config: Config, dtype: torch.dtype, shapes=None):
        """The state bytes per parameter its configuration holds (for fastsched and the
        baseline, which hold exactly that; the libraries' rules differ in detail)."""
        cfg, dt = self._fixed(config, dtype)
        return cfg.state_bytes_per_param(dt, shapes)


def state_nbytes(states: Iterable[dict]) -> int:
    """Bytes of every tensor in the optimizer's per-parameter ``states`` except ``step``.

    Tensor subclasses (torchao's ``OptimState8bit``: codes, scales, quantisation map) count
    their inner tensors, DTensors their local shard; a tensor shared by several states
    (bitsandbytes' quantisation map) counts once.
    """
    seen: set[tuple[int, int, int]] = set()
    total = 0

    def add(t: torch.Tensor) -> None:
        nonlocal total
        if hasattr(t, "to_local") and hasattr(t, "placements"):
            t = t.to_local()
        flatten = getattr(type(t), "__tensor_flatten__", None)
        if flatten is not None and type(t) is not torch.Tensor \
                and not isinstance(t, torch.nn.Parameter):
            names, _ = t.__tensor_flatten__()
            for n in names:
                add(getattr(t, n))
            return
        key = (t.data_ptr(), t.numel(), t.element_size())
        if t.numel() and key in seen:
            return
        seen.add(key)
        total += t.numel() * t.element_size()

    for st in states:
        for k, v in st.items():
            if k != "step" and isinstance(v, torch.Tensor):
                add(v)
    return total


def library_versions() -> dict[str, str | None]:
    """Installed versions of the optional contenders' libraries (None: not installed)."""
    import importlib.metadata as md

    out: dict[str, str | None] = {}
    for name in ("torchao", "bitsandbytes"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


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

_FUSED_SGD_PROBE: dict[torch.dtype, str] = {}


def _fused_sgd_fault(dtype: torch.dtype) -> str:
    """Why torch's fused CPU SGD computes a wrong step on ``dtype`` parameters ("" if it does
    not; cached). torch 2.12-2.13 leave the whole SIMD blocks of bf16 and fp16 parameters
    unchanged and update only the remainder, and read the momentum buffer wrongly from the
    second step (pytorch/pytorch#191763, fixed by #192545): two steps with momentum on 67
    elements against the for-loop steps on the same values, which must agree to a few units in
    the last place of ``dtype``."""
    if dtype in _FUSED_SGD_PROBE:
        return _FUSED_SGD_PROBE[dtype]
    base = torch.linspace(-2.0, 2.0, 67).to(dtype)
    grad = torch.linspace(1.0, -1.5, 67).to(dtype)
    out = []
    for flags in ({"fused": True}, {"foreach": False}):
        p = torch.nn.Parameter(base.clone())
        opt = torch.optim.SGD([p], lr=0.1, momentum=0.9, **flags)
        for k in range(2):
            p.grad = grad * (1.0 - 0.5 * k)
            opt.step()
        out.append(p.detach().float())
    err = (out[0] - out[1]).abs()
    tol = 4 * torch.finfo(dtype).eps * out[1].abs().clamp(min=1.0)
    bad = int((err > tol).sum())
    why = "" if bad == 0 else (
        f"torch {torch.__version__}'s fused CPU SGD computed a wrong step on "
        f"{DTYPE_NAMES.get(dtype, dtype)} parameters ({bad} of 67 elements differ from the "
        "for-loop's after two steps; pytorch/pytorch#191763: the SIMD blocks are left "
        "unchanged): a wrong step is not timed")
    _FUSED_SGD_PROBE[dtype] = why
    return why


def _build_torch(impl: str) -> Callable[[Setup], Built]:
    def build(setup: Setup) -> Built:
        if impl == "fused" and setup.config.key == "sgd" and not setup.dev.is_cuda \
                and setup.dtype in (torch.bfloat16, torch.float16):
            why = _fused_sgd_fault(setup.dtype)
            if why:
                raise Unavailable(why)
        st = setup.config.storage
        if st is not None and st.states is not None \
                and {"bf16": torch.bfloat16, "fp32": torch.float32}.get(st.states) != setup.dtype:
            raise Skipped(f"torch.optim keeps the states in the parameters' dtype: no torch "
                          f"optimizer holds {st.states} states of "
                          f"{DTYPE_NAMES.get(setup.dtype, setup.dtype)} parameters (the 'vs "
                          "fp32 AdamW' column compares with torch's fused fp32 AdamW)")
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
        if setup.config.storage is not None:
            return fastsched.AdamW(setup.params, **HYPER, schedule=setup.schedule,
                                   **setup.config.storage.options())
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


def _effective_backend(opt) -> tuple[str, str]:
    """(the backend that runs the step, a note when it is not the one ``opt.backend`` names):
    the compiled CPU executor sends tensors with options below fp32 to the reference backend
    until it supports them (``fastsched.optim._cpu.SUPPORTS_LOWP``)."""
    backend = opt.backend
    if backend != "cpu":
        return backend, ""
    from ..optim import _cpu

    if getattr(_cpu, "SUPPORTS_LOWP", False):
        return backend, ""
    try:
        pos, lowp = 0, False
        for group in opt.param_groups:
            for p in group["params"]:
                lowp = lowp or opt._lowp_entry(p, group, pos) is not None
                pos += 1
    except Exception:  # noqa: BLE001 - a fastsched without these options: nothing to say
        return backend, ""
    if not lowp:
        return backend, ""
    return "reference", ("ran on the reference backend (PyTorch operators): the compiled CPU "
                         "executor does not run these options yet "
                         "(fastsched.optim._cpu.SUPPORTS_LOWP is not set)")


def _build_fastsched(setup: Setup) -> Built:
    opt = _fastsched_opt(setup)
    backend, note = _effective_backend(opt)
    info = {"backend": backend}
    if note:
        info["note"] = note
    return Built(opt.step, info=info, keep=opt)


def _build_fastsched_plain(setup: Setup) -> Built:
    """fastsched's AdamW with the same schedule on the same tensors, without the
    configuration's ALLoRA multipliers, timed with it (on the CPU in the same rounds): what
    the per-unit learning rates cost on top of the step (the 'vs plain step' ratio; times of
    different configurations are taken minutes apart and a shared machine drifts between
    them)."""
    import fastsched

    opt = fastsched.AdamW(setup.params, **HYPER, schedule=setup.schedule)
    backend, note = _effective_backend(opt)
    info = {"backend": backend}
    if note:
        info["note"] = note
    return Built(opt.step, info=info, keep=opt)


def _build_fastsched_graph(setup: Setup) -> Built:
    _need_cuda(setup)
    opt = _fastsched_opt(setup)
    graph = _capture(opt.step, setup.dev)
    return Built(graph.replay, info={"backend": opt.backend}, keep=(opt, graph))


# -- below fp32: torch's master weights, torchao, bitsandbytes, the fp32 baseline -----------------

def _build_torch_master(setup: Setup) -> Built:
    """What apex's and Transformer Engine's master weights do, with torch's fused AdamW: fp32
    copies of the bf16 parameters own the optimizer; each step copies the bf16 gradients into
    fp32 master gradients, steps the masters and copies them back into the parameters."""
    if setup.dtype not in (torch.bfloat16, torch.float16):
        raise Skipped("master weights are for bf16 / fp16 parameters")
    params = setup.params
    masters = [torch.nn.Parameter(p.detach().float()) for p in params]
    for m in masters:
        m.grad = torch.zeros_like(m)
    opt = torch.optim.AdamW(masters, **HYPER, fused=True)
    low = [p.detach() for p in params]
    grads = [p.grad for p in params]
    mgrads = [m.grad for m in masters]
    mdata = [m.detach() for m in masters]

    @torch.no_grad()
    def step() -> None:
        torch._foreach_copy_(mgrads, grads)
        opt.step()
        torch._foreach_copy_(low, mdata)

    n = sum(p.numel() for p in params)
    extra = sum(g.numel() * g.element_size() for g in mgrads) / max(1, n)
    e = _esize(setup.dtype)
    info = {"other_held_bytes_per_param": extra,
            "note": f"also holds fp32 master gradients ({extra:g} B/param, not optimizer "
                    f"state); moves {2 * e + 8} B/param more than the one-pass step: the "
                    f"gradient copy ({e} + 4) and the copy back (4 + {e})"}
    return Built(step, info=info, keep=(opt, masters),
                 states=lambda: [{**opt.state[m], "master_param": m} for m in masters])


def _import(module: str, package: str):
    import importlib

    try:
        return importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - a broken install is "not importable" too
        raise Skipped(f"{package} is not importable ({type(e).__name__}: {str(e)[:200]}); "
                      f"pip install {package} (or fastsched[contenders])") from e


def _first_step_or_skip(opt, setup: Setup, what: str) -> None:
    """Run the first step inside the build: a library that cannot run on this device is
    skipped with the reason, not recorded as a failure of the benchmark."""
    try:
        opt.step()
    except Exception as e:  # noqa: BLE001
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise Skipped(f"{what} does not run on {setup.dev.kind} tensors here "
                      f"({type(e).__name__}: {first})") from e


_TORCHAO_NOTE = ("torchao compiles its per-tensor step with torch.compile (one graph per "
                 "shape and state kind): the first step includes those compiles")


def _build_torchao_sr(setup: Setup) -> Built:
    if setup.dtype != torch.bfloat16:
        raise Skipped("stochastic rounding is for bf16 parameters")
    ao = _import("torchao.optim", "torchao")
    cls = getattr(ao, "AdamW", None) or getattr(ao, "_AdamW", None)
    if cls is None:
        raise Skipped("this torchao has neither torchao.optim.AdamW nor torchao.optim._AdamW")
    try:
        opt = cls(setup.params, **HYPER, bf16_stochastic_round=True)
    except TypeError as e:
        raise Skipped(f"torchao {cls.__name__} takes no bf16_stochastic_round ({e})") from e
    _first_step_or_skip(opt, setup, f"torchao {cls.__name__}(bf16_stochastic_round=True)")
    return Built(opt.step, info={"note": _TORCHAO_NOTE, "class": f"torchao.optim.{cls.__name__}"},
                 keep=opt)


def _build_torchao_8bit(setup: Setup) -> Built:
    ao = _import("torchao.optim", "torchao")
    sr = bool(setup.config.storage and setup.config.storage.sr)
    if sr and setup.dtype != torch.bfloat16:
        raise Skipped("stochastic rounding is for bf16 parameters")
    opt = ao.AdamW8bit(setup.params, **HYPER, bf16_stochastic_round=sr)
    _first_step_or_skip(opt, setup, "torchao AdamW8bit")
    return Built(opt.step, info={"note": _TORCHAO_NOTE + "; tensors under 4096 elements or "
                                 "not a multiple of 256 keep states in the parameters' dtype"},
                 keep=opt)


def _build_bnb_8bit(setup: Setup) -> Built:
    bnb = _import("bitsandbytes", "bitsandbytes")
    opt = bnb.optim.AdamW8bit(setup.params, **HYPER)
    _first_step_or_skip(opt, setup, f"bitsandbytes {getattr(bnb, '__version__', '')} AdamW8bit")
    return Built(opt.step, info={"note": "bitsandbytes keeps fp32 states for tensors under "
                                 "4096 elements (min_8bit_size)"}, keep=opt)


def _build_baseline(setup: Setup) -> Built:
    """torch's fused AdamW on fp32 copies of the parameters: the step every configuration below
    fp32 would replace, timed in the same rounds (the 'vs fp32 AdamW' ratio)."""
    params = [torch.nn.Parameter(p.detach().float()) for p in setup.params]
    for p, q in zip(params, setup.params):
        p.grad = q.grad.float()
    for q in setup.params:
        q.grad = None
    opt = torch.optim.AdamW(params, **HYPER, fused=True)
    return Built(opt.step, keep=(opt, params))


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
    Contender("fastsched-plain", "fastsched, plain step", "plain", _build_fastsched_plain,
              fixed=("adamw", None),
              description="ALLoRA only: fastsched's AdamW step and schedule on the same tensors "
              "without the per-row multipliers, timed in the same run (on the CPU in the same "
              "rounds, built after the others); 'vs plain step' = its time / fastsched's "
              "ALLoRA step's (ALLoRA's target: at most 1.10x its time)"),
    Contender("fp32-baseline", "torch fused AdamW fp32 (baseline)", "baseline", _build_baseline,
              fixed=("adamw", torch.float32),
              description="below fp32: torch.optim.AdamW(fused=True) on fp32 copies of the "
              "parameters, the step the configuration replaces, timed in the same rounds; GB/s "
              "at its own 28 B/param; 'vs fp32 AdamW' = its time / a contender's"),
    Contender("torch-master", "torch fused on fp32 masters", "torch", _build_torch_master,
              description="bf16 parameters with fp32 master copies as apex / Transformer Engine "
              "keep them: _foreach_copy_ of the bf16 gradients into fp32 master gradients, "
              "torch.optim.AdamW(fused=True) on the masters, _foreach_copy_ of the masters into "
              "the parameters"),
    Contender("torchao-sr", "torchao AdamW, bf16 SR", "library", _build_torchao_sr,
              description="torchao.optim._AdamW(bf16_stochastic_round=True) (torchao.optim.AdamW "
              "where a torchao exports it): bf16 states, stochastic rounding of the parameters; "
              "per-tensor steps compiled with torch.compile"),
    Contender("torchao-8bit", "torchao AdamW8bit", "library", _build_torchao_8bit,
              description="torchao.optim.AdamW8bit (block 256, dynamic map; "
              "bf16_stochastic_round=True in the SR configuration); per-tensor steps compiled "
              "with torch.compile"),
    Contender("bnb-8bit", "bitsandbytes AdamW8bit", "library", _build_bnb_8bit,
              description="bitsandbytes bnb.optim.AdamW8bit (blockwise, min_8bit_size 4096)"),
    Contender("stream", "stream ceiling", "ceiling", _build_stream, fixed=("adamw", None),
              description="CPU only: the compiled extension's in-place kernel with AdamW's "
              "access pattern (4 reads, 3 writes of each 32-bit word, no arithmetic) on "
              "AdamW's bytes: the bandwidth an AdamW step can reach on this machine"),
)}

#: the contenders of a CPU run unless --contenders says otherwise: torch's fastest CPU
#: implementation (fused), fastsched (the compiled CPU backend) and the stream ceiling
CPU_CONTENDERS = ("torch-fused", "fastsched", "fastsched-plain", "stream", "fp32-baseline",
                  "torch-master", "torchao-sr", "torchao-8bit", "bnb-8bit")
#: contenders a default CPU run adds for one configuration: torch's foreach SGD, in every
#: dtype, so that SGD keeps a torch contender where torch's fused CPU SGD computes a wrong step
#: (bf16 and fp16 in torch 2.12-2.13: :func:`_fused_sgd_fault`)
CPU_EXTRA = {"sgd": ("torch-foreach",)}

_BY_CONFIG = {
    "adamw": ("torch-forloop", "torch-foreach", "torch-fused", "torch-fused-graph",
              "torch-compile", "fastsched", "fastsched-graph", "stream"),
    "adamw-clip": ("torch-forloop", "torch-foreach", "torch-fused", "torch-fused-graph",
                   "torch-compile", "fastsched", "fastsched-graph"),
    "allora": ("torch-fused", "torch-fused-graph", "fastsched", "fastsched-graph",
               "fastsched-plain"),
    "sgd": ("torch-forloop", "torch-foreach", "torch-fused", "torch-fused-graph", "fastsched",
            "fastsched-graph"),
    # below fp32: the fp32 baseline, the contenders doing the same job, fastsched (and, with
    # 8-bit states, the stream ceiling of the set and dtype: % of stream for every entry)
    "adamw-master": ("fp32-baseline", "torch-master", "fastsched"),
    "adamw-sr": ("fp32-baseline", "torchao-sr", "fastsched"),
    "adamw-bf16-states": ("fp32-baseline", "torch-fused", "fastsched"),
    "adamw-8bit": ("fp32-baseline", "torchao-8bit", "bnb-8bit", "fastsched", "stream"),
    "adamw-sr-8bit": ("fp32-baseline", "torchao-8bit", "fastsched"),
}


def contenders_for(config: str, cpu: bool | None = None) -> list[Contender]:
    """The contenders of ``config``: every one (``cpu`` None), those of a default CPU run
    (:data:`CPU_CONTENDERS` and :data:`CPU_EXTRA`, ``cpu`` True) or of a default GPU run (all
    but the CPU ceiling)."""
    keys = _BY_CONFIG[config]
    if cpu is True:
        extra = CPU_EXTRA.get(config, ())
        keys = tuple(k for k in keys if k in CPU_CONTENDERS or k in extra)
    elif cpu is False:
        keys = tuple(k for k in keys if k != "stream")
    return [CONTENDERS[k] for k in keys]


def leaves_of(master) -> list[torch.nn.Parameter]:
    """Parameters cloned from ``master`` (``params_of``'s pair), each with its gradient cloned:
    what every contender, and every CPU A/B script, steps."""
    mp, mg = master
    params = [torch.nn.Parameter(p.clone()) for p in mp]
    for p, g in zip(params, mg):
        p.grad = g.clone()
    return params


#: --dtype of the CPU A/B scripts in bench/
CPU_SCRIPT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def cpu_script_setup(description: str, argv, *, rounds: int):
    """The command line and tensors of a CPU A/B script (bench/grad_stats_read.py,
    bench/unit_pipe_ab.py): ``--set --scale --threads --dtype --rounds --json``; None (after
    saying why on stderr) without the compiled CPU backend; else (args, the scaled shape set,
    its parameters with gradients), torch's thread count set."""
    import argparse
    import sys

    from ..optim import _cpu
    from .shapes import get_shape_set

    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--set", default="llama-1b")
    ap.add_argument("--scale", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", choices=sorted(CPU_SCRIPT_DTYPES), default="fp32")
    ap.add_argument("--rounds", type=int, default=rounds)
    ap.add_argument("--json", default=None, help="write the medians here")
    args = ap.parse_args(argv)
    if not _cpu.available():
        print(f"needs the compiled CPU backend: {_cpu.reason()}", file=sys.stderr)
        return None
    if args.rounds < 1 or args.threads < 1:
        ap.error("--rounds and --threads must be >= 1")
    torch.set_num_threads(args.threads)
    sset = get_shape_set(args.set).scaled(args.scale)
    return args, sset, leaves_of(params_of(sset.shapes, CPU_SCRIPT_DTYPES[args.dtype],
                                           torch.device("cpu"), 0))


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

"""Proof that the replayed launches of ``step()`` are exactly the launches of the JIT path.

With the stand-in H100 driver (``bench/standin``: sm_90 code, Triton 3.6's generated launcher,
a no-op ``cuLaunchKernelEx``) every launcher call (``CudaLauncher.__call__``) is recorded:
kernel (name, hash), grid, stream, function, packed metadata, every argument; pointers named
by the tensor of THIS step they point into (``groups``, ``plan.partials+64``...). Per
configuration two identical optimizers (fp32 + bf16: two update buckets) take the same 6 steps
(new gradient objects, moved on some steps; ``lr`` changed at step 4; new GradScaler tensors
every step), one with ``fastsched.kernels.replay.ENABLED = False``, one replaying. Passes when
at every step both launch sequences are equal (a stale dynamic address names no tensor of the
step), the replaying optimizer holds a recording and from step 2 on made no
``JITFunction.run`` call and launched only from ``Recording.replay``, with no launch hook set,
and the stub driver counted every call. Hook arguments (launch metadata, HookChains: None in a
replay) are not compared. Exit status 0: pass; 1: a mismatch (printed).

    env -u TRITON_INTERPRET ~/.cache/sm90-venv/bin/python bench/launch_check.py
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.pop("TRITON_INTERPRET", None)

import standin  # noqa: E402

standin.install()

import torch  # noqa: E402
from fastsched.kernels import replay  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.nvidia.driver import CudaLauncher  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

import fastsched  # noqa: E402
from fastsched.optim import FusedOptimizer, functional  # noqa: E402
from fastsched.schedules import Cosine  # noqa: E402

FusedOptimizer._check_backend = lambda self: "triton"  # CPU tensors through the stand-in

STEPS = 6
POOL = (0, 0, 1, 1, 2, 0)  # per step, the gradients' storage: 1, 2 and 0 again are moves
LR_STEP = 4  # param_groups[0]["lr"] changes before this step (1-based)
F32 = ((3,), (257, 33), (4099,), (17, 5, 3))
B16 = ((129, 65), (7,), (2049,))


class S:  # what the interceptors record (launches: the step under way, None between steps)
    launches: list | None = None
    labels, errors = [], []
    jit_runs = in_jit = unknown = total = 0


def _named(v, name: str, out: list, depth: int = 0) -> None:
    """(name, tensor) of every tensor in ``v`` (lists, tuples, dataclasses: the plan)."""
    if isinstance(v, torch.Tensor):
        out.append((name, v))
    elif depth < 3 and isinstance(v, (list, tuple)):
        for i, x in enumerate(v):
            _named(x, f"{name}[{i}]", out, depth + 1)
    elif depth < 3 and dataclasses.is_dataclass(v) and not isinstance(v, type):
        for f in dataclasses.fields(v):
            _named(getattr(v, f.name), f"{name}.{f.name}", out, depth + 1)


_orig_run_triton = functional._run_triton


def _run_triton(plan, buffers, groups, cfg, table, options, gs, fi):
    """Name every tensor the step's launches may point into, then run the step."""
    out = [("groups", groups), ("cfg", cfg), ("sched_table", table), ("grad_scale", gs),
           ("found_inf", fi)]
    _named(plan, "plan", out)
    _named([p.grad for p in plan.params], "grad", out)
    for k, v in vars(buffers).items():
        _named(v, f"buffers.{k}", out)
    S.labels = [(t.data_ptr(), t.data_ptr() + t.numel() * t.element_size(), n) for n, t in out
                if t is not None]
    return _orig_run_triton(plan, buffers, groups, cfg, table, options, gs, fi)


def _label(addr, unknown: dict) -> str:
    """The tensor of the step that ``addr`` points at (into: ``name+offset``)."""
    if not isinstance(addr, int):
        return repr(addr)
    name = next((n for lo, _, n in S.labels if addr == lo), None) or next(
        (f"{n}+{addr - lo}" for lo, hi, n in S.labels if lo < addr < hi), None)
    if name is None and addr not in unknown:  # in no tensor of the step: a stale address?
        unknown[addr], S.unknown = f"?{len(unknown)}", S.unknown + 1
    return name or unknown[addr]


_orig_init, _orig_call, _orig_jit = CudaLauncher.__init__, CudaLauncher.__call__, JITFunction.run


def _init(self, src, metadata):
    _orig_init(self, src, metadata)
    self.lc_name = f"{metadata.name}/{metadata.hash[:12]}"
    self.lc_ptr = {i for i, t in enumerate(src.signature.values()) if str(t).startswith("*")}


def _call(self, gx, gy, gz, stream, function, packed, launch_md, enter, exit_, *args):
    S.total += 1
    if S.launches is not None:
        via = "jit" if S.in_jit else "replay"
        hooks = (launch_md, enter, exit_, knobs.runtime.launch_enter_hook,
                 knobs.runtime.launch_exit_hook)
        if via == "replay" and any(h is not None and getattr(h, "calls", True) for h in hooks):
            S.errors.append(f"a replayed launch of {self.lc_name} with a launch hook")
        unknown: dict = {}
        norm = [("ptr", _label(a.data_ptr() if isinstance(a, torch.Tensor) else a, unknown))
                if i in self.lc_ptr else (type(a).__name__, a) for i, a in enumerate(args)]
        S.launches.append((via, (self.lc_name, (gx, gy, gz), stream, function, packed, norm)))
    return _orig_call(self, gx, gy, gz, stream, function, packed, launch_md, enter, exit_, *args)


def _jit_run(self, *args, **kwargs):
    S.jit_runs += 1
    S.in_jit += 1
    try:
        return _orig_jit(self, *args, **kwargs)
    finally:
        S.in_jit -= 1


CONFIGS = {
    "adamw+schedule": lambda ps: fastsched.AdamW(ps, lr=1e-3, schedule=Cosine(1000)),
    "adamw clip+stats": lambda ps: fastsched.AdamW(ps, lr=1e-3, max_grad_norm=1.0, stats=True),
    "sgd momentum": lambda ps: fastsched.SGD(ps, lr=1e-2, momentum=0.9),
    "adamw gradscaler": lambda ps: fastsched.AdamW(ps, lr=1e-3),
    # the scale's dtype alternates (a custom scaler): a kernel specialised on the other pointer
    # type must not be replayed with it; every step records anew through the JIT
    "scaler dtype change": lambda ps: fastsched.AdamW(ps, lr=1e-3),
    "adamw allora": lambda ps: fastsched.AdamW(
        [{"params": ps[:1]}, {"params": [ps[1]], "allora_eta": 4.0}, {"params": ps[2:]}]),
    "bf16 master_weights": lambda ps: fastsched.AdamW(
        [{"params": ps[len(F32):], "master_weights": True}, {"params": ps[:len(F32)]}]),
}


class Run:
    """One optimizer and its gradient storage; ``step`` returns that step's launches."""

    def __init__(self, config: str, replaying: bool):
        self.params = [torch.nn.Parameter(torch.zeros(s)) for s in F32] + [
            torch.nn.Parameter(torch.zeros(s, dtype=torch.bfloat16)) for s in B16]
        self.opt, self.config, self.replaying = CONFIGS[config](self.params), config, replaying
        self.opt.allow_lr_changes = True  # (the lr change of step LR_STEP, under a schedule)
        self.pools: dict = {}
        self.kept: list = []  # earlier scaler tensors stay alive: new ones get new addresses

    def step(self, k: int) -> tuple[list, int]:
        """Step ``k`` (1-based): its launches (via, launch) and its JITFunction.run calls."""
        pool = self.pools.setdefault(POOL[k - 1], [torch.zeros_like(p) for p in self.params])
        for p, g in zip(self.params, pool):
            p.grad = g.view_as(g)  # a new gradient object over the pool's storage
        if k == LR_STEP:
            self.opt.param_groups[0]["lr"] *= 0.5
        if self.config in ("adamw gradscaler", "scaler dtype change"):
            dtype = torch.float64 if self.config != "adamw gradscaler" and k % 2 == 0 \
                else torch.float32
            self.opt.grad_scale = torch.full((1,), 2.0 ** (16 - k), dtype=dtype)
            self.opt.found_inf = torch.zeros(1, dtype=dtype)
            self.kept += [self.opt.grad_scale, self.opt.found_inf]
        S.launches, S.jit_runs, was = [], 0, replay.ENABLED
        replay.ENABLED = self.replaying
        try:
            self.opt.step()
        finally:
            replay.ENABLED = was
        out, S.launches = S.launches, None
        self.opt.zero_grad()
        return out, S.jit_runs


FIELDS = ("kernel", "grid", "stream", "function", "packed metadata", "arguments")


def _diff(a: list, b: list) -> str:
    """The first difference of two launch sequences, in words."""
    i = next(i for i in range(max(len(a), len(b))) if a[i:i + 1] != b[i:i + 1])
    if i >= min(len(a), len(b)):
        return f"{len(a)} JIT launches, {len(b)} replayed: {(a[i:] or b[i:])[0][0]} in one only"
    x, y = a[i], b[i]
    j = next(j for j in range(6) if x[j] != y[j])
    n = next((n for n, (u, v) in enumerate(zip(x[5], y[5])) if u != v), None)
    what, u, v = (f"argument {n}", x[5][n], y[5][n]) if j == 5 and n is not None else (
        FIELDS[j], x[j], y[j])
    return f"launch {i} ({x[0]}): {what} {u} through the JIT, {v} replayed"


def check(config: str) -> tuple[list, list]:
    """Step both optimizers of ``config``: (failures, table row)."""
    jit, rep = Run(config, False), Run(config, True)
    bad, per_step, replayed, equal = [], set(), 0, True
    for k in range(1, STEPS + 1):
        (lj, runs_j), (lr_, runs_r) = jit.step(k), rep.step(k)
        per_step.add(len(lr_))
        if not lj or any(v != "jit" for v, _ in lj) or runs_j == 0:
            bad.append(f"step {k}: the JIT optimizer's launches did not all go through the JIT")
        a, b = [x for _, x in lj], [x for _, x in lr_]
        if a != b:
            equal = False
            bad.append(f"step {k}: {_diff(a, b)}")
        if rep.opt._tables.plan is None or rep.opt._tables.plan.replay is None:
            bad.append(f"step {k}: the replaying optimizer has no recording")
        if k >= 2 and config == "scaler dtype change":
            if not runs_r or any(v != "jit" for v, _ in lr_):
                bad.append(f"step {k}: replayed although the scale's dtype changed")
        elif k >= 2:
            if runs_r or not lr_ or any(v != "replay" for v, _ in lr_):
                bad.append(f"step {k}: not replayed ({runs_r} JITFunction.run calls)")
            else:
                replayed += 1
    return bad, [config, "/".join(map(str, sorted(per_step))), replayed, equal]


def main() -> int:
    CudaLauncher.__init__, CudaLauncher.__call__, JITFunction.run = _init, _call, _jit_run
    functional._run_triton = _run_triton
    t0, n0 = time.perf_counter(), standin.launches()
    failures = []
    print(f"{'configuration':<22}{'launches/step':>14}{'replayed steps':>16}  equal")
    for config in CONFIGS:
        start = len(S.errors)
        bad, row = check(config)
        failures += [f"{config}: {b}" for b in bad + S.errors[start:]]
        print(f"{row[0]:<22}{row[1]:>14}{row[2]:>12}/{STEPS - 1:<3}  {'yes' if row[3] else 'NO'}",
              flush=True)
    stub = standin.launches() - n0
    print(f"{S.total} launcher calls, {stub} reached the stub driver; {S.unknown} pointer "
          f"arguments named no tensor of their step; {time.perf_counter() - t0:.1f} s")
    if stub != S.total:
        failures.append(f"{S.total} launcher calls but {stub} launches reached the driver")
    if S.unknown:
        failures.append(f"{S.unknown} pointer arguments point into no tensor of their step")
    for f in failures:
        print("FAILED:", f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

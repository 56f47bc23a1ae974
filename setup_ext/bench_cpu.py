"""Timing of the compiled CPU executor against torch's fused CPU optimizers, in one process.

    python setup_ext/bench_cpu.py [--scale 0.1] [--rounds 9] [--steps 4] [--threads 1 2]

GPT-2 small shapes (``fastsched.bench.shapes``, ``gpt2`` scaled by ``--scale``: 0.1 gives 148
tensors, 12.5M parameters), float32 (the SGD pair marked bf16: bfloat16 p, grad, buffer; the
AdamW contenders below fp32: 8-bit states of fp32 parameters, bfloat16 parameters with an fp32
master, 8-bit states or stochastic rounding, each against torch's fused fp32 AdamW, the step it
would replace). ``--only`` keeps the contenders whose name contains one of its words (and the torch
ones they are compared with). Every contender owns its tensors; rounds are interleaved
(one batch of ``--steps`` steps of every contender per round) and the median of the rounds is
reported, per thread count, with GB/s at 28 B/param (AdamW: p, g, m, v read, p, m, v written)
and the ratio to the torch contender it replaces. ``stream`` is the extension's bandwidth
ceiling: the same 28 B/param in place with no arithmetic.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import fastsched
from fastsched.bench.shapes import SHAPE_SETS
from fastsched.optim import _cpu
from fastsched.schedules import Cosine

BYTES = 28


def _params(shapes, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    ps = [torch.nn.Parameter((torch.randn(s, generator=gen) * 0.02).to(dtype)) for s in shapes]
    for p in ps:
        p.grad = (torch.randn(p.shape, generator=gen) * 1e-3).to(dtype)
    return ps


def contenders(shapes, total_steps):
    """name -> (step function, torch contender it is compared with or None)."""
    out = {}
    lam = Cosine(total_steps=total_steps, warmup_steps=10)

    ps = _params(shapes, 0)
    opt = torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.1, fused=True)
    out["torch fused AdamW"] = (opt.step, None)

    ps = _params(shapes, 0)
    opt2 = torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.1, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt2, lam)

    def clip_fused(ps=ps, opt=opt2, sched=sched):
        torch.nn.utils.clip_grad_norm_(ps, 1.0)
        opt.step()
        sched.step()
    out["torch clip+fused AdamW+LambdaLR"] = (clip_fused, None)

    def ours(**kw):
        o = fastsched.AdamW(_params(shapes, 0), lr=1e-3, weight_decay=0.1, backend="cpu",
                            schedule=lam, **kw)
        return o.step

    out["fastsched AdamW cpu +schedule"] = (ours(), "torch fused AdamW")
    out["fastsched AdamW cpu clip+stats+guard+schedule"] = (
        ours(max_grad_norm=1.0, stats=True, nonfinite="skip"), "torch clip+fused AdamW+LambdaLR")
    out["fastsched AdamW cpu ALLoRA rows +schedule"] = (
        ours(allora_eta=0.1, allora_unit="row"), "torch fused AdamW")
    # below fp32 (each against torch's fused fp32 AdamW, the step it would replace)
    out["fastsched AdamW cpu 8-bit states"] = (ours(state_dtype="8bit"), "torch fused AdamW")
    out["fastsched AdamW cpu 8-bit states clip+stats+guard"] = (
        ours(state_dtype="8bit", max_grad_norm=1.0, stats=True, nonfinite="skip"),
        "torch clip+fused AdamW+LambdaLR")
    out["fastsched AdamW cpu 8-bit states ALLoRA rows"] = (
        ours(state_dtype="8bit", allora_eta=0.1, allora_unit="row"), "torch fused AdamW")

    def ours_bf16(**kw):
        o = fastsched.AdamW(_params(shapes, 0, torch.bfloat16), lr=1e-3, weight_decay=0.1,
                            backend="cpu", schedule=lam, **kw)
        return o.step

    out["fastsched AdamW cpu bf16 + fp32 master"] = (ours_bf16(master_weights=True),
                                                     "torch fused AdamW")
    out["fastsched AdamW cpu bf16 stochastic rounding"] = (
        ours_bf16(stochastic_rounding=True), "torch fused AdamW")
    out["fastsched AdamW cpu bf16 + 8-bit states"] = (ours_bf16(state_dtype="8bit"),
                                                     "torch fused AdamW")
    out["fastsched AdamW cpu bf16 SR + 8-bit states"] = (
        ours_bf16(stochastic_rounding=True, state_dtype="8bit"), "torch fused AdamW")

    ps = _params(shapes, 0)
    sgd = torch.optim.SGD(ps, lr=1e-2, momentum=0.9, fused=True)
    out["torch fused SGD momentum"] = (sgd.step, None)
    osgd = fastsched.SGD(_params(shapes, 0), lr=1e-2, momentum=0.9, backend="cpu",
                         schedule=lam)
    out["fastsched SGD momentum cpu +schedule"] = (osgd.step, "torch fused SGD momentum")

    bf = torch.bfloat16
    sgdb = torch.optim.SGD(_params(shapes, 0, bf), lr=1e-2, momentum=0.9, fused=True)
    out["torch fused SGD momentum bf16"] = (sgdb.step, None)
    osgdb = fastsched.SGD(_params(shapes, 0, bf), lr=1e-2, momentum=0.9, backend="cpu",
                          schedule=lam)
    out["fastsched SGD momentum cpu bf16 +schedule"] = (osgdb.step,
                                                        "torch fused SGD momentum bf16")

    n = sum(p.numel() for p in _params(shapes, 0))
    bufs = [torch.zeros(n, dtype=torch.int32) for _ in range(4)]
    ext = _cpu.ext()

    def stream(bufs=bufs, n=n):
        ext.stream(*(b.data_ptr() for b in bufs), n, torch.get_num_threads())
    out["stream ceiling (4 reads, 3 writes)"] = (stream, None)
    return out, n


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=float, default=0.1)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--only", nargs="+", default=None)
    a = ap.parse_args(argv)
    shapes = SHAPE_SETS["gpt2"].scaled(a.scale).shapes
    runs, n = contenders(shapes, total_steps=10 * a.rounds * a.steps * len(a.threads) + 100)
    if a.only:
        keep = {k for k in runs if any(w in k for w in a.only)}
        keep |= {runs[k][1] for k in keep if runs[k][1]}
        runs = {k: v for k, v in runs.items() if k in keep}
    print(f"gpt2 x{a.scale}: {len(shapes)} tensors, {n / 1e6:.2f}M params, float32; "
          f"torch {torch.__version__}; median of {a.rounds} interleaved rounds of {a.steps} "
          f"steps")
    for nt in a.threads:
        torch.set_num_threads(nt)
        times = {k: [] for k in runs}
        for f, _ in runs.values():  # warm up
            f()
        for _ in range(a.rounds):
            for k, (f, _) in runs.items():
                t0 = time.perf_counter()
                for _ in range(a.steps):
                    f()
                times[k].append((time.perf_counter() - t0) / a.steps)
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"\n{nt} thread{'s' if nt > 1 else ''}:")
        print(f"  {'contender':48s} {'ms/step':>8s} {'GB/s@28B':>9s} {'vs torch':>9s}")
        for k, (_, base) in runs.items():
            ratio = f"{med[base] / med[k]:8.2f}x" if base else ""
            print(f"  {k:48s} {med[k] * 1e3:8.2f} {n * BYTES / med[k] / 1e9:9.2f} {ratio:>9s}")


if __name__ == "__main__":
    main()

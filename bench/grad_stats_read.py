"""How fast the compiled CPU backend's gradient statistics pass reads, against torch reading the
same gradients.

    python bench/grad_stats_read.py [--set llama-1b] [--scale 0.1] [--threads 1] [--dtype fp32]
                                    [--rounds 10] [--json FILE]

With clipping (``max_grad_norm``), the guard or ``stats=True``, a step begins with one read of
every gradient: per block of 8192 elements the sum of squares and of magnitudes in float64
(``grad_sums`` in setup_ext/kernels.h; exact squares, so the clip coefficient is the reference
backend's bit for bit) and the non-finite count. That pass is what clipping adds to an AdamW
step's 28 bytes a parameter. This times it alone (the extension call a real step made, replayed
with the same tables), in rounds alternated with ``torch.Tensor.sum`` over the same gradient
tensors and ``torch._foreach_norm`` of them (what ``clip_grad_norm_`` does first), and prints
medians and GB/s of gradient bytes. Needs the compiled CPU backend.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import torch

import fastsched
from fastsched.bench.contenders import cpu_script_setup
from fastsched.optim import _cpu


class _Capture:
    """The extension with its ``grad_stats`` calls recorded (arguments: raw table pointers that
    stay valid while the optimizer and its tensors live)."""

    def __init__(self, ext):
        self.ext, self.calls = ext, []

    def __getattr__(self, name):
        f = getattr(self.ext, name)
        if name != "grad_stats":
            return f

        def record(*args):
            self.calls.append(args)
            return f(*args)
        return record


def main(argv=None) -> int:
    setup = cpu_script_setup(__doc__.splitlines()[0], argv, rounds=10)
    if setup is None:
        return 2
    args, sset, params = setup
    opt = fastsched.AdamW(params, lr=1e-3, max_grad_norm=1.0, stats=True, backend="cpu")
    ext = _cpu.ext()
    cap = _Capture(ext)
    _cpu._ext = cap
    try:
        opt.step()
    finally:
        _cpu._ext = ext
    if len(cap.calls) != 1:
        print(f"expected one statistics call in the step, saw {len(cap.calls)}", file=sys.stderr)
        return 1
    call = cap.calls[0]
    grads = [p.grad for p in params]
    nbytes = sum(g.numel() * g.element_size() for g in grads)
    timed = {
        "fastsched grad_stats": lambda: ext.grad_stats(*call),
        "torch sum per tensor": lambda: [g.sum() for g in grads],
        "torch _foreach_norm": lambda: torch._foreach_norm(grads),
    }
    times = {k: [] for k in timed}
    for r in range(args.rounds + 1):  # round 0 warms up
        for name, f in timed.items():
            t = time.perf_counter()
            f()
            if r:
                times[name].append(time.perf_counter() - t)
    print(f"{sset.name} x{args.scale} {args.dtype}, {len(grads)} gradients, {nbytes / 1e6:.0f} MB, "
          f"{args.threads} thread(s), medians of {args.rounds} rounds:")
    out = {}
    for name, ts in times.items():
        m = statistics.median(ts)
        out[name] = {"ms": m * 1e3, "GB/s": nbytes / m / 1e9}
        print(f"  {name:24s} {m * 1e3:8.2f} ms  {nbytes / m / 1e9:6.1f} GB/s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"set": sset.name, "scale": args.scale, "dtype": args.dtype,
                       "threads": args.threads, "bytes": nbytes, "results": out}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

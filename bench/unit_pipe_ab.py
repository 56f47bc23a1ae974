"""What reading an ALLoRA row's sum of squares beside the update of the row before saves on a CPU.

    python bench/unit_pipe_ab.py [--set llama-1b] [--scale 0.1] [--threads 1] [--dtype fp32]
                                 [--rounds 20] [--json FILE]

The compiled CPU backend updates ALLoRA rows of 1024-8192 elements 512 elements at a time and
adds the next row's weights to its sum between the pieces (``unit_pipe`` in
setup_ext/cpu_ext.cpp); ``fastsched._cpu_ext.unit_pipe(False)`` sums each row alone before its
update instead (the same bits). Two optimizers built one after the other do not run at the same
speed on a shared VM (the one built second measured 1-3% faster), so this times *one* ALLoRA
AdamW optimizer (rows, eta 1, the benchmark's hyperparameters and cosine schedule) with its
steps alternated between the two settings, the stream ceiling (the extension's in-place kernel
with AdamW's access pattern) in the same rounds, and prints medians, GB/s at AdamW's bytes per
parameter and the % of the ceiling. Needs the compiled CPU backend.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import torch

import fastsched
from fastsched.bench.contenders import HYPER, cpu_script_setup
from fastsched.optim import _cpu
from fastsched.schedules import Cosine


def main(argv=None) -> int:
    setup = cpu_script_setup(__doc__.splitlines()[0], argv, rounds=20)
    if setup is None:
        return 2
    args, sset, params = setup
    ext = _cpu.ext()
    dtype = params[0].dtype
    opt = fastsched.AdamW([{"params": params, "allora_eta": 1.0, "allora_unit": "row"}],
                          **HYPER, schedule=Cosine(1000, warmup_steps=100, min_ratio=0.1))
    n = sum(p.numel() for p in params)
    bpp = 7 * torch.finfo(dtype).bits // 8  # AdamW: p, g, m, v read; p, m, v written
    words = max(1, n * bpp // 28)  # the ceiling moves AdamW's bytes: 7 words of 4 bytes each
    bufs = [torch.zeros(words, dtype=torch.int32) for _ in range(4)]

    def stream() -> None:
        ext.stream(*(b.data_ptr() for b in bufs), words, args.threads)

    def step(on: bool):
        def run() -> None:
            ext.unit_pipe(on)
            opt.step()
        return run

    was = ext.unit_pipe(True)
    try:
        runs = {"summed beside the update": step(True), "summed alone first": step(False),
                "stream ceiling": stream}
        for f in runs.values():
            for _ in range(2):
                f()
        times: dict[str, list[float]] = {k: [] for k in runs}
        keys = list(runs)
        for r in range(args.rounds):
            for k in (keys if r % 2 == 0 else keys[::-1]):
                t0 = time.perf_counter()
                runs[k]()
                times[k].append(time.perf_counter() - t0)
    finally:
        ext.unit_pipe(was)
    med = {k: statistics.median(v) for k, v in times.items()}
    ceiling = n * bpp / med["stream ceiling"] / 1e9
    print(f"{sset.name} x{args.scale:g}: {len(params)} tensors, {n / 1e6:.2f}M params, "
          f"{args.dtype}, {args.threads} thread(s), {args.rounds} interleaved rounds; "
          f"torch {torch.__version__}")
    for k, t in med.items():
        gbps = n * bpp / t / 1e9
        print(f"  {k:26s} {t * 1e3:8.2f} ms  {gbps:6.1f} GB/s at {bpp} B/param  "
              f"{100 * gbps / ceiling:5.1f}% of stream")
    ratio = med["summed beside the update"] / med["summed alone first"]
    print(f"  beside / alone: {ratio:.3f}x the step time")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"set": sset.name, "scale": args.scale, "dtype": args.dtype,
                       "threads": args.threads, "rounds": args.rounds, "params": n,
                       "bytes_per_param": bpp, "median_s": med, "ratio": ratio,
                       "torch": torch.__version__}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

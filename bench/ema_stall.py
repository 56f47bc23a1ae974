"""Does an 8-bit second moment follow its EMA? fastsched, bitsandbytes and torchao against fp32.

    python bench/ema_stall.py [--numel 65536] [--steps 2000] [--seed 0] [--json FILE]

Why: with beta2 = 0.999 one step changes ``exp_avg_sq`` by 0.1% of itself plus 0.001 g^2, while
an 8-bit code is several % wide (fastsched's unsigned E5M3: 1/16 of a value's binade either side;
the dynamic maps of bitsandbytes and torchao: 1-3% near the block's absmax, coarser below).
Rounded to nearest, a change smaller than half a code is lost at every step, so the stored
moment can stall where the fp32 one keeps moving: it cannot decay by the EMA alone after the
gradients shrink, and grows only on gradients far above it. The step is ``m / sqrt(v)``, so
the ratio sqrt(v_8bit / v_fp32) is the factor by which the 8-bit optimizer's step is too small
(> 1) or too large (< 1).

The experiment: one tensor of ``--numel`` elements; gradients ``sigma * z`` with z ~ N(0, 1)
drawn afresh every step and sigma per element log-uniform over two decades (1e-4 .. 1e-2, mixed
within every quantisation block, as the gradient magnitudes of a weight matrix are); for
``--steps`` steps sigma stays fixed (phase "steady"), then it drops 10x for ``--steps`` steps
("shrink": the fp32 moment decays by 100x with a time constant of 1000 steps), then it rises
100x for ``--steps`` steps ("grow"). Every optimizer sees the same gradients with lr = 0 (the
parameters stay put, so only the moments differ) and weight decay 0. Printed at the end of
every quarter of each phase: the median and the 5th / 95th percentiles over the elements of
sqrt(v_8bit / v_fp32), per optimizer; the fp32 reference is torch.optim.AdamW. Contenders that
do not import are left out with the reason. ``--models`` adds :class:`CodecModel`. CPU only
(under a minute at the defaults).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from fastsched.kernels import layout as L

import fastsched
from fastsched.optim import _lowp

PHASES = (("steady", 1.0), ("shrink", 0.1), ("grow", 10.0))


def _contenders(p_init: torch.Tensor) -> tuple[dict, dict]:
    """name -> (param, optimizer, read v as float32) and name -> why it is left out."""
    out, skipped = {}, {}

    def param():
        return torch.nn.Parameter(p_init.clone())

    p = param()
    out["fp32 (torch AdamW)"] = (p, torch.optim.AdamW([p], lr=0.0, weight_decay=0.0),
                                 lambda o, p: o.state[p]["exp_avg_sq"].float())
    for backend in ("cpu", "reference"):
        p = param()
        try:
            o = fastsched.AdamW([p], lr=0.0, weight_decay=0.0, state_dtype="8bit", min_8bit_size=0,
                                backend=backend)
        except (RuntimeError, ValueError) as e:  # the compiled executor is not built
            skipped[f"fastsched 8bit ({backend})"] = str(e).splitlines()[0]
            continue
        out[f"fastsched 8bit ({backend})"] = (
            p, o, lambda o, p: o.export_state_dict()["state"][0]["exp_avg_sq"].float())
        break  # one fastsched backend: they give the same bits (tests/optim/test_lowp_cpu.py)
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bf

        p = param()
        o = bnb.optim.AdamW8bit([p], lr=0.0, weight_decay=0.0)

        def bnb_v(o, p):
            st = o.state[p]
            return bf.dequantize_blockwise(st["state2"], absmax=st["absmax2"],
                                           code=st["qmap2"], blocksize=256).float()

        out["bitsandbytes AdamW8bit"] = (p, o, bnb_v)
    except Exception as e:  # noqa: BLE001 - any import or construction failure: left out
        skipped["bitsandbytes AdamW8bit"] = f"{type(e).__name__}: {e}".splitlines()[0]
    try:
        from torchao.optim import AdamW8bit

        p = param()
        out["torchao AdamW8bit"] = (p, AdamW8bit([p], lr=0.0, weight_decay=0.0),
                                    lambda o, p: o.state[p]["exp_avg_sq"].dequantize().float())
    except Exception as e:  # noqa: BLE001
        skipped["torchao AdamW8bit"] = f"{type(e).__name__}: {e}".splitlines()[0]
    return out, skipped


class CodecModel:
    """A what-if, not an optimizer option: the second moment alone, updated as fastsched's Adam
    updates it (``(1 - omb2) * v + omb2 * g * g`` in float32, ``omb2 = 1 - beta2`` rounded once)
    and stored in fastsched's unsigned 8-bit code (``fastsched.optim._lowp``: 256-element blocks,
    ``scale = absmax / 1.875``, ``inv = (1 / absmax) * 1.875``, 5-bit exponent and 3-bit
    mantissa). ``sr=False``: the codec itself (round to nearest even: fastsched's own states,
    bit for bit); ``sr=True``: the same codes rounded stochastically (a uniform 20-bit integer
    added below the kept bits of ``a = |v| * inv`` before they are cut: up with probability
    equal to the distance from the code below, in units of a code; the subnormal codes, below
    2^-30 of a block's absmax, stay rounded to nearest)."""

    def __init__(self, numel: int, sr: bool, seed: int, beta2: float = 0.999):
        self.v = torch.zeros(numel)
        self.sr = sr
        self.gen = torch.Generator().manual_seed(seed + 1)
        self.omb2 = torch.tensor(1.0 - beta2, dtype=torch.float32)

    def step(self, g: torch.Tensor) -> None:
        v = (1.0 - self.omb2) * self.v + self.omb2 * g * g
        codes, scale = _lowp.quantize(v, signed=False)
        if self.sr:
            a = _lowp.scaled_blocks(v)[1].reshape(-1)  # what the codec rounds, exactly
            sh = 23 - L.Q_MANT
            r = torch.randint(0, 1 << sh, a.shape, generator=self.gen)
            up = ((_lowp._bits(a) + r) >> sh) - ((127 - L.Q_BIAS_UNSIGNED) << L.Q_MANT)
            normal = a >= 2.0 ** (1 - L.Q_BIAS_UNSIGNED)
            codes = torch.where(normal, up, codes.to(torch.int64)).to(torch.uint8)
        self.v = _lowp.dequantize(codes, scale, signed=False)


def run(numel: int, steps: int, seed: int, models: bool = False) -> dict:
    if numel < 4096 or numel % 256:
        # bitsandbytes and torchao keep fp32 states below 4096 elements (and torchao for a
        # tensor that is not a whole number of blocks): they would not be 8-bit here
        raise ValueError(f"numel must be a multiple of 256 and at least 4096, got {numel}")
    gen = torch.Generator().manual_seed(seed)
    sigma = torch.exp(torch.empty(numel).uniform_(0, 1, generator=gen) * -torch.log(
        torch.tensor(100.0))) * 1e-2  # log-uniform in [1e-4, 1e-2]
    opts, skipped = _contenders(torch.zeros(numel))
    if models:  # (param, optimizer, read): the model is its own "optimizer"
        for sr in (False, True):
            m = CodecModel(numel, sr, seed)
            opts[f"model E5M3 {'stochastic' if sr else 'nearest'}"] = (None, m, lambda o, p: o.v)
    rows = []
    step = 0
    t0 = time.perf_counter()
    for phase, factor in PHASES:
        sigma = sigma * factor
        for k in range(steps):
            g = sigma * torch.randn(numel, generator=gen)
            for p, o, _ in opts.values():
                if p is None:
                    o.step(g)
                    continue
                p.grad = g.clone()
                o.step()
            step += 1
            if (k + 1) % max(1, steps // 4) == 0:
                ref = None
                row = {"phase": phase, "step": step}
                for name, (p, o, read) in opts.items():
                    v = read(o, p).reshape(-1)
                    if ref is None:
                        ref = v
                        continue
                    r = torch.sqrt(v.double() / ref.double())
                    q = torch.quantile(r, torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64))
                    row[name] = [round(float(x), 4) for x in q]
                rows.append(row)
                print(_line(row, opts), flush=True)
    return {"numel": numel, "steps_per_phase": steps, "seed": seed, "rows": rows,
            "skipped": skipped, "seconds": round(time.perf_counter() - t0, 1),
            "torch": torch.__version__, "fastsched": fastsched.__version__}


def _line(row: dict, opts: dict) -> str:
    cells = [f"{row['phase']:6s} step {row['step']:5d}"]
    for name in list(opts)[1:]:
        lo, mid, hi = row[name]
        cells.append(f"{name}: {mid:.3f} [{lo:.3f}, {hi:.3f}]")
    return " | ".join(cells)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--numel", type=int, default=65536)
    ap.add_argument("--steps", type=int, default=2000, help="steps of each of the 3 phases")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default="", help="write the rows here as JSON")
    ap.add_argument("--models", action="store_true",
                    help="add the plain-PyTorch model of the second moment's code, rounded to "
                         "nearest and stochastically (CodecModel: a what-if)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    print("sqrt(v_8bit / v_fp32): median [5th, 95th percentile] over the elements "
          "(> 1: the 8-bit step is too small, < 1: too large)")
    res = run(args.numel, args.steps, args.seed, args.models)
    for name, why in res["skipped"].items():
        print(f"left out: {name}: {why}")
    print(f"{res['seconds']} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

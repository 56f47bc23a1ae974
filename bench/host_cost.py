"""Host CPU time fastsched adds to a training iteration, through Triton's real launcher.

Runs ``step()`` + ``zero_grad()`` of ``fastsched.AdamW`` on the Triton path with a stand-in H100
driver (``bench/standin``: kernels compile for sm_90 and go through Triton's generated launcher;
only the driver's launch call is a no-op), with NEW gradient objects every step, as
``zero_grad(set_to_none=True)`` + ``backward()`` give, and times it with the process CPU clock
(all threads). Beside it, in the same run and interleaved, a calibration loop
``[p.grad for p in params]`` measures how fast this machine runs Python over the same
parameters. The budget is 50 us + 2.5 x the calibration. fastsched registers no hooks, so a
backward costs the same with it.

    ~/.cache/sm90-venv/bin/python bench/host_cost.py              # triton 3.6, as on the GPUs
    python bench/host_cost.py --sets lora-7b --steps 400 --json out.json

Results: a table on stdout and, with ``--json``, a file with the machine, versions and medians.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.pop("TRITON_INTERPRET", None)

import standin  # noqa: E402

standin.install()

import torch  # noqa: E402
import triton  # noqa: E402

import fastsched  # noqa: E402
from fastsched.bench.shapes import SHAPE_SETS  # noqa: E402
from fastsched.optim import FusedOptimizer  # noqa: E402
from fastsched.schedules import Cosine  # noqa: E402

# CPU tensors on the Triton path: the optimizer would ask for the interpreter; the stand-in
# driver compiles and "launches" instead
FusedOptimizer._check_backend = lambda self: "triton"

CONFIGS = {
    "schedule": dict(schedule=Cosine(10_000)),
    "clip+stats+schedule": dict(schedule=Cosine(10_000), max_grad_norm=1.0, stats=True),
}
SETS = ("gpt2", "lora-7b", "many-small")
#: element counts do not change the host path (tables hold addresses): small copies of each set
SCALE = {"gpt2": 0.05, "llama-1b": 0.02, "lora-7b": 1.0, "many-small": 1.0}


def _machine() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=Path(fastsched.__file__).parent).stdout.strip()
    except OSError:
        return "unknown"


#: how backward() re-creates the gradients after zero_grad(set_to_none=True): new tensor objects
#: at the addresses of the last step (what CUDA's caching allocator usually hands back), or at
#: addresses that alternate between two pools (the gradient column is rewritten every step)
GRADS = ("same addresses", "moved")


class Case:
    def __init__(self, set_name: str, config: str, grads: str):
        shapes = SHAPE_SETS[set_name].scaled(SCALE[set_name]).shapes
        self.name, self.config, self.grads = set_name, config, grads
        self.params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
        self.opt = fastsched.AdamW(self.params, lr=1e-3, **CONFIGS[config])
        self.pools = [[torch.zeros_like(p) for p in self.params]
                      for _ in range(2 if grads == "moved" else 1)]
        self.k = 0
        self.times: list[float] = []
        self.calib: list[float] = []

    def new_grads(self) -> None:
        """New gradient objects made by a real backward(), as after zero_grad(set_to_none=True):
        autograd's AccumulateGrad adopts the incoming gradient (a new C++ tensor over the
        pool's storage, with no Python object until someone reads ``p.grad``), so the
        addresses are the pool's while the objects, as in training, are new every step."""
        self.k += 1
        pool = self.pools[self.k % len(self.pools)]
        with torch.enable_grad():
            torch.autograd.backward([p.view_as(p) for p in self.params], pool)

    def once(self) -> None:
        self.new_grads()
        t0 = time.process_time_ns()
        self.opt.step()
        self.opt.zero_grad()
        self.times.append((time.process_time_ns() - t0) / 1e3)
        self.new_grads()
        t0 = time.process_time_ns()
        [p.grad for p in self.params]  # noqa: B018 - the calibration loop
        self.calib.append((time.process_time_ns() - t0) / 1e3)
        self.opt.zero_grad()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", nargs="+", default=list(SETS), choices=sorted(SHAPE_SETS))
    ap.add_argument("--steps", type=int, default=300, help="timed steps per case (>= 200)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps (compilation)")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    cases = [Case(s, c, g) for s in args.sets for c in CONFIGS for g in GRADS]
    for c in cases:
        for _ in range(args.warmup):
            c.once()
        c.times.clear()
        c.calib.clear()
    launches0 = standin.launches()
    # interleaved rounds within a shape set (drift of the machine hits each of its cases alike);
    # sets one after the other: a 2000-tensor case between two steps of a 148-tensor one left
    # its tables out of cache and doubled its time (690 vs 360 us), which is not its host path
    for s in args.sets:
        mine = [c for c in cases if c.name == s]
        for _ in range(args.steps):
            for c in mine:
                c.once()
    rows = []
    for c in cases:
        med, cal = statistics.median(c.times), statistics.median(c.calib)
        q = statistics.quantiles(c.times, n=10)
        budget = 50.0 + 2.5 * cal
        rows.append({"set": c.name, "config": c.config, "grads": c.grads,
                     "tensors": len(c.params),
                     "step_zero_grad_us": round(med, 1), "p10_us": round(q[0], 1),
                     "p90_us": round(q[-1], 1), "calibration_us": round(cal, 1),
                     "budget_us": round(budget, 1), "within_budget": med <= budget,
                     "table_builds": c.opt.table_builds if hasattr(c.opt, "table_builds")
                     else None})
    print(f"{'set':<11} {'config':<20} {'gradients':<15} {'tensors':>7} {'step+zero_grad':>15} "
          f"{'p10-p90':>15} {'calib':>8} {'budget':>8}  within")
    for r in rows:
        print(f"{r['set']:<11} {r['config']:<20} {r['grads']:<15} {r['tensors']:>7} "
              f"{r['step_zero_grad_us']:>12.1f} us {r['p10_us']:>6.0f}-{r['p90_us']:<6.0f}us "
              f"{r['calibration_us']:>6.1f}us {r['budget_us']:>6.1f}us  {r['within_budget']}")
    n_launch = (standin.launches() - launches0) / (args.steps * len(cases))
    print(f"{n_launch:.2f} launches a step on average; process CPU time, median of "
          f"{args.steps} interleaved steps; {_machine()}; torch {torch.__version__}, "
          f"triton {triton.__version__}, fastsched {_commit()}")
    if args.json:
        args.json.write_text(json.dumps({
            "machine": _machine(), "date": time.strftime("%Y-%m-%d"),
            "torch": torch.__version__, "triton": triton.__version__, "commit": _commit(),
            "steps": args.steps, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

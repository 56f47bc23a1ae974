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


#: how the gradients of a step come: the same tensor objects every step (no zero_grad: the
#: reference the new-object steps are held against), or, as zero_grad(set_to_none=True) +
#: backward() give, new objects at the addresses of the last step (what CUDA's caching
#: allocator usually hands back) or at addresses that alternate between two pools (the gradient
#: column is rewritten every step)
GRADS = ("same tensors", "same addresses", "moved")
#: who makes the new gradient objects: a real backward() (C++ tensors; the calibration loop's
#: `p.grad` creates their Python objects, ~0.5 us each) or, with --grads-from python, Python
#: (`p.grad = g.view_as(g)`: the objects exist, the calibration only reads them; the stricter
#: budget, and not what a training loop does)
MAKER = "backward"


class Case:
    def __init__(self, set_name: str, config: str, grads: str):
        shapes = SHAPE_SETS[set_name].scaled(SCALE[set_name]).shapes
        self.name, self.config, self.grads = set_name, config, grads
        self.params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
        self.opt = fastsched.AdamW(self.params, lr=1e-3, **CONFIGS[config])
        self.pools = [[torch.zeros_like(p) for p in self.params]
                      for _ in range(2 if grads == "moved" else 1)]
        self.k = 0
        self.step_us: list[float] = []
        self.zero_us: list[float] = []
        self.calib: list[float] = []
        self.torch_zero: list[float] = []

    def new_grads(self) -> None:
        """New gradient objects made by a real backward(), as after zero_grad(set_to_none=True):
        autograd's AccumulateGrad adopts the incoming gradient (a new C++ tensor over the
        pool's storage, with no Python object until someone reads ``p.grad``), so the
        addresses are the pool's while the objects, as in training, are new every step."""
        self.k += 1
        pool = self.pools[self.k % len(self.pools)]
        if MAKER == "python":  # Python objects from the start: `[p.grad ...]` wraps nothing
            for p, g in zip(self.params, pool):
                p.grad = g.view_as(g)
            return
        with torch.enable_grad():
            torch.autograd.backward([p.view_as(p) for p in self.params], pool)

    def once(self) -> None:
        clock = time.process_time_ns  # every thread of the process
        same = self.grads == "same tensors"
        if not same or self.params[0].grad is None:
            self.new_grads()
        t0 = clock()
        self.opt.step()
        t1 = clock()
        if not same:
            self.opt.zero_grad()
        t2 = clock()
        self.step_us.append((t1 - t0) / 1e3)
        self.zero_us.append((t2 - t1) / 1e3)
        if same:
            return
        self.new_grads()
        t0 = clock()
        [p.grad for p in self.params]  # noqa: B018 - the calibration loop
        self.calib.append((clock() - t0) / 1e3)
        # torch's own zero_grad on the same gradients, for scale: freeing the gradients is
        # most of a zero_grad's time whoever does it
        t0 = clock()
        torch.optim.Optimizer.zero_grad(self.opt, set_to_none=True)
        self.torch_zero.append((clock() - t0) / 1e3)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", nargs="+", default=list(SETS), choices=sorted(SHAPE_SETS))
    ap.add_argument("--steps", type=int, default=300, help="timed steps per case (>= 200)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps (compilation)")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    ap.add_argument("--grads-from", choices=("backward", "python"), default="backward",
                    help="who makes each step's new gradient objects (see MAKER)")
    args = ap.parse_args(argv)
    global MAKER
    MAKER = args.grads_from
    torch.set_num_threads(1)
    try:  # the host helper built (or found in the cache) before anything is timed
        from fastsched.optim import _hostext
        _hostext.wait()
    except ImportError:
        pass
    cases = [Case(s, c, g) for s in args.sets for c in CONFIGS for g in GRADS]
    for c in cases:
        for _ in range(args.warmup):
            c.once()
        c.step_us.clear()
        c.zero_us.clear()
        c.calib.clear()
        c.torch_zero.clear()
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
    med = statistics.median
    for c in cases:
        ref = next(r for r in cases if (r.name, r.config, r.grads) ==
                   (c.name, c.config, "same tensors"))
        total = [a + b for a, b in zip(c.step_us, c.zero_us)]
        q = statistics.quantiles(total, n=10)
        cal = med(c.calib) if c.calib else None
        budget = None if cal is None else 50.0 + 2.5 * cal
        rows.append({"set": c.name, "config": c.config, "grads": c.grads,
                     "tensors": len(c.params), "step_us": round(med(c.step_us), 1),
                     "zero_grad_us": None if c.grads == "same tensors"
                     else round(med(c.zero_us), 1),
                     "step_zero_grad_us": round(med(total), 1), "p10_us": round(q[0], 1),
                     "p90_us": round(q[-1], 1),
                     "step_vs_same_tensors": round(med(c.step_us) / med(ref.step_us), 2),
                     "calibration_us": None if cal is None else round(cal, 1),
                     "torch_zero_grad_us": round(med(c.torch_zero), 1) if c.torch_zero
                     else None,
                     "budget_us": None if budget is None else round(budget, 1),
                     "within_budget": None if budget is None else med(total) <= budget,
                     "table_builds": getattr(c.opt, "table_builds", None)})
    print(f"{'set':<11} {'config':<20} {'gradients':<15} {'tensors':>7} {'step':>9} "
          f"{'zero_grad':>9} {'sum':>9} {'p10-p90':>12} {'vs same':>7} {'calib':>8} "
          f"{'budget':>8}  within  {'torch zero_grad':>15}")
    for r in rows:
        z = "-" if r["zero_grad_us"] is None else f"{r['zero_grad_us']:.1f}"
        cal = "-" if r["calibration_us"] is None else f"{r['calibration_us']:.1f}"
        bud = "-" if r["budget_us"] is None else f"{r['budget_us']:.1f}"
        within = "-" if r["within_budget"] is None else str(r["within_budget"])
        tz = "-" if r["torch_zero_grad_us"] is None else f"{r['torch_zero_grad_us']:.1f}"
        print(f"{r['set']:<11} {r['config']:<20} {r['grads']:<15} {r['tensors']:>7} "
              f"{r['step_us']:>9.1f} {z:>9} {r['step_zero_grad_us']:>9.1f} "
              f"{r['p10_us']:>5.0f}-{r['p90_us']:<6.0f} {r['step_vs_same_tensors']:>6.2f}x "
              f"{cal:>8} {bud:>8}  {within:<6}  {tz:>15}")
    try:  # (versions before the host helper and the replay have neither)
        from fastsched.kernels import replay

        from fastsched.optim import _hostext
        paths = f"host helper: {_hostext.status()}; launch replay: {replay.ENABLED}"
    except ImportError:
        paths = "host helper: none; launch replay: none (this version has neither)"
    print(paths)
    n_launch = (standin.launches() - launches0) / (args.steps * len(cases))
    print(f"gradients made by {MAKER}; {n_launch:.2f} launches a step on average; process CPU "
          f"time, median of {args.steps} interleaved steps; {_machine()}; "
          f"torch {torch.__version__}, triton {triton.__version__}, fastsched {_commit()}")
    if args.json:
        args.json.write_text(json.dumps({
            "machine": _machine(), "date": time.strftime("%Y-%m-%d"),
            "torch": torch.__version__, "triton": triton.__version__, "commit": _commit(),
            "steps": args.steps, "grads_from": MAKER, "paths": paths, "rows": rows},
            indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

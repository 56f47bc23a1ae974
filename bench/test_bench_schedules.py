"""Schedule evaluation benchmarks: host ``sched(t)``, vectorised torch over 10,000 steps, the
Triton kernel over 10,000 steps, and an ``LRScheduler.step()`` with ScheduleLR vs LambdaLR.

``pytest bench/test_bench_schedules.py --benchmark-only``. On a machine without a GPU the kernel
runs under the Triton interpreter, so its time is the interpreter's, not a GPU's.
"""

from __future__ import annotations

import pytest
import torch
from conftest import KERNEL_DEVICE
from fastsched.kernels.schedule import evaluate_schedule
from torch.optim.lr_scheduler import LambdaLR

from fastsched.schedules import REX, WSD, Cosine, Infinite, Join, LinearWarmup, ScheduleLR

SCHEDULES = {
    "cosine": Cosine(10_000, warmup_steps=1_000, min_ratio=0.1),
    "wsd-1-sqrt": WSD(warmup_steps=1_000, total_steps=10_000, decay_shape="1-sqrt"),
    "infinite-anneal": Infinite(1_000, 3_000, 0.3, anneal_start=8_000, anneal_steps=1_500),
    "join": Join((LinearWarmup(500), REX(5_000), Cosine(5_000)), (500, 5_500)),
}
STEPS = torch.randint(0, 12_000, (10_000,), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", list(SCHEDULES))
@pytest.mark.benchmark(group="host sched(t)", max_time=0.2, min_rounds=50)
def test_host_call(benchmark, name):
    sched = SCHEDULES[name]
    assert benchmark(sched, 7_777) == float(sched.evaluate(torch.tensor([7_777]))[0])


@pytest.mark.parametrize("name", list(SCHEDULES))
@pytest.mark.benchmark(group="vectorised evaluate(10k steps)", max_time=0.5, min_rounds=5)
def test_vectorised(benchmark, name):
    sched = SCHEDULES[name]
    out = benchmark(sched.evaluate, STEPS)
    assert out.shape == STEPS.shape


@pytest.mark.parametrize("name", list(SCHEDULES))
@pytest.mark.benchmark(group=f"triton kernel (10k steps, {KERNEL_DEVICE})")
def test_kernel(benchmark, name):
    sched = SCHEDULES[name]
    table, steps = sched.table(KERNEL_DEVICE), STEPS.to(KERNEL_DEVICE)

    def run():
        out = evaluate_schedule(table, steps)
        if KERNEL_DEVICE == "cuda":
            torch.cuda.synchronize()
        return out

    out = benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
    torch.testing.assert_close(out.cpu(), sched.evaluate(STEPS), rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("adapter", ["ScheduleLR", "LambdaLR"])
@pytest.mark.benchmark(group="LRScheduler.step()", max_time=0.3, min_rounds=20)
def test_scheduler_step(benchmark, adapter):
    sched = SCHEDULES["wsd-1-sqrt"]
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    lr_sched = ScheduleLR(opt, sched) if adapter == "ScheduleLR" else LambdaLR(opt, sched)
    opt.step()  # torch warns about a scheduler stepped before its optimizer
    benchmark(lr_sched.step)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * sched(lr_sched.last_epoch))

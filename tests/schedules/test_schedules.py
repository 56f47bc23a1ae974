"""Schedules: host, vectorised torch and Triton evaluation agree; bad input; serialisation."""

from __future__ import annotations

import json
import math
import pickle

import pytest
import torch
import triton
import triton.language as tl
from fastsched.kernels.schedule import evaluate_schedule, schedule_value
from schedule_cases import CASES, boundary_steps, horizon, sample_steps

from fastsched.schedules import (
    REGISTRY,
    REX,
    WSD,
    Constant,
    Cosine,
    CosineRestarts,
    Exponential,
    Infinite,
    InverseSqrt,
    Join,
    LinearDecay,
    LinearWarmup,
    MultiStep,
    OneCycle,
    Polynomial,
    Power,
    Rewarm,
    Scaled,
    Schedule,
    Shape,
    StepDecay,
    Table,
    from_dict,
)

RTOL = 1e-6
ATOL = 1e-12  # for values that are exactly 0 on one side (a floor of 0, a scaled-by-0 schedule)
IDS = [name for name, _ in CASES]


def assert_agree(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL, msg=lambda m: f"{what}: {m}")


def test_catalogue_covers_every_schedule_class():
    covered = {type(s) for _, s in CASES}
    for _, s in CASES:  # nested schedules count too
        if isinstance(s, Join):
            covered.update(type(x) for x in s.schedules)
        if isinstance(s, Scaled):
            covered.add(type(s.schedule))
    assert set(REGISTRY.values()) <= covered


# -- host == vectorised == Triton ---------------------------------------------------------------

@pytest.mark.parametrize("name,sched", CASES, ids=IDS)
def test_host_vectorised_and_kernel_agree(name, sched, kernel_device):
    steps = sample_steps(sched)
    assert steps.numel() >= 10_000
    vec = sched.evaluate(steps)
    assert vec.dtype == torch.float64 and vec.shape == steps.shape
    assert torch.isfinite(vec).all() and (vec >= 0).all()
    host = torch.tensor([sched(t) for t in steps.tolist()], dtype=torch.float64)
    assert_agree(host, vec, "host vs vectorised")
    kern = evaluate_schedule(sched.table(kernel_device), steps.to(kernel_device)).cpu()
    assert_agree(kern, vec, "Triton vs vectorised")


# step, exponential, inverse-sqrt and power-law decays have no end: test_unbounded_decays
BOUNDED = [(n, s) for n, s in CASES if s.segments()[-1].shape == Shape.CONST]


def test_only_decays_without_end_are_unbounded():
    for _, s in CASES:
        last = s.segments()[-1]
        assert math.isinf(last.length)
        assert last.shape in (Shape.CONST, Shape.EXP_RATE, Shape.INV_SQRT, Shape.POWER)


@pytest.mark.parametrize("name,sched", BOUNDED, ids=[n for n, _ in BOUNDED])
def test_steps_past_the_end_hold_the_final_value(name, sched):
    last = sched.segments()[-1]
    end = horizon(sched)
    late = torch.tensor([end, end + 1, 2 * end, 10 * end, 10**9, 2**40])
    vals = sched.evaluate(late)
    assert torch.all(vals == vals[0]), vals
    assert vals[0] == last.v0
    assert sched(10**12) == float(vals[0])


def test_unbounded_decays():
    for sched in (StepDecay(10**4, gamma=0.5), Exponential(0.99999), InverseSqrt(10),
                  Power(1e7, 1024), Join((Constant(), Exponential(0.99999)), (10,))):
        vals = sched.evaluate(torch.tensor([10**4, 10**5, 10**6]))
        assert vals[0] > vals[1] > vals[2] >= 0


def test_evaluate_any_integer_dtype_and_shape():
    sched = Cosine(100, warmup_steps=10, min_ratio=0.1)
    steps = torch.arange(0, 120).reshape(4, 30)
    ref = sched.evaluate(steps)
    assert ref.shape == (4, 30)
    for dtype in (torch.int32, torch.int16, torch.uint8):
        torch.testing.assert_close(sched.evaluate(steps.to(dtype)), ref, rtol=0, atol=0)
    assert sched.evaluate(torch.zeros(0, dtype=torch.int64)).shape == (0,)
    assert sched.evaluate(torch.tensor(50)).shape == ()
    assert sched.evaluate([0, 50]).tolist() == [sched(0), sched(50)]
    with pytest.raises(ValueError, match="steps must be an integer tensor"):
        sched.evaluate(torch.tensor([1.0]))


def test_host_accepts_integral_numbers():
    import numpy as np

    sched = LinearDecay(100)
    assert sched(np.int64(50)) == sched(50) == sched(50.0) == 0.5


@pytest.mark.parametrize("bad", [-1, -10**9])
def test_negative_steps_are_an_error(bad):
    sched = Cosine(100)
    with pytest.raises(ValueError, match="step must be an integer >= 0"):
        sched(bad)
    with pytest.raises(ValueError, match="steps must be >= 0"):
        sched.evaluate(torch.tensor([0, 5, bad]))


@pytest.mark.parametrize("bad", [1.5, math.nan, math.inf, "3", None, True])
def test_non_integer_steps_are_an_error(bad):
    with pytest.raises(ValueError, match="step must be an integer >= 0"):
        Cosine(100)(bad)


def test_host_call_rejects_tensors():
    with pytest.raises(TypeError, match="evaluate"):
        Cosine(100)(torch.tensor(3))


def test_kernel_treats_negative_steps_as_step_zero(kernel_device):
    # Documented: on a device the check would synchronise, so a negative step clamps to 0.
    sched = WSD(warmup_steps=10, total_steps=100)
    steps = torch.tensor([-5, -1, 0], device=kernel_device)
    out = evaluate_schedule(sched.table(kernel_device), steps).cpu()
    assert out.tolist() == [sched(0)] * 3


@triton.jit
def _lr_from_counter_kernel(seg_ptr, n_seg, step_ptr, base_lr_ptr, lr_ptr,
                            SEG_BLOCK: tl.constexpr):
    # The pattern of an optimizer's finalize launch: the step lives in device memory, the
    # learning rate is computed and stored on the device, the counter is advanced in place.
    offs = tl.arange(0, 1)
    step = tl.load(step_ptr + offs)
    f = schedule_value(seg_ptr, n_seg, step.to(tl.float64), SEG_BLOCK)
    tl.store(lr_ptr + offs, tl.load(base_lr_ptr + offs) * f)
    tl.store(step_ptr + offs, step + 1)


def test_device_function_from_a_step_counter(kernel_device):
    sched = Join((LinearWarmup(5), Cosine(20, min_ratio=0.1)), (5,))
    table = sched.table(kernel_device)
    step = torch.zeros(1, dtype=torch.int64, device=kernel_device)
    base_lr = torch.full((1,), 3e-4, dtype=torch.float64, device=kernel_device)
    lr = torch.empty(1, dtype=torch.float64, device=kernel_device)
    got = []
    for _ in range(30):
        _lr_from_counter_kernel[(1,)](table, table.shape[0], step, base_lr, lr, SEG_BLOCK=16)
        got.append(lr.item())
    assert step.item() == 30
    want = [3e-4 * sched(t) for t in range(30)]
    assert got == pytest.approx(want, rel=1e-12, abs=1e-18)


def test_kernel_many_segments(kernel_device):
    # more rows than one SEG_BLOCK: the row search loops over blocks
    sched = CosineRestarts(7, cycles=150)
    steps = torch.arange(0, 1200)
    out = evaluate_schedule(sched.table(kernel_device), steps.to(kernel_device), seg_block=16)
    assert sched.table().shape[0] > 100
    assert_agree(out.cpu(), sched.evaluate(steps), "Triton vs vectorised")


def test_kernel_launcher_validates():
    with pytest.raises(ValueError, match="table must be a float64"):
        evaluate_schedule(torch.zeros(2, 8), torch.arange(3))
    with pytest.raises(ValueError, match="table must be a float64"):
        evaluate_schedule(torch.zeros(2, 7, dtype=torch.float64), torch.arange(3))


def test_boundary_steps_cover_every_phase():
    sched = WSD(warmup_steps=50, total_steps=1000, decay_steps=200)
    pts = boundary_steps(sched)
    for b in (50, 800, 1000):
        assert {b - 1, b, b + 1} <= set(pts)


# -- values at known points ---------------------------------------------------------------------

def test_values_at_phase_boundaries():
    s = WSD(warmup_steps=100, total_steps=1000, decay_steps=200, decay_shape="linear",
            min_ratio=0.1)
    assert [s(0), s(50), s(100), s(799), s(800), s(900), s(1000), s(5000)] == pytest.approx(
        [0.0, 0.5, 1.0, 1.0, 1.0, 0.55, 0.1, 0.1])
    c = Cosine(200, warmup_steps=100, min_ratio=0.2)
    assert [c(100), c(150), c(200), c(300)] == pytest.approx([1.0, 0.6, 0.2, 0.2])
    i = Infinite(10, 90, 0.5, anneal_start=200, anneal_steps=100, min_ratio=0.05)
    assert [i(10), i(100), i(150), i(200), i(250), i(300), i(10**6)] == pytest.approx(
        [1.0, 0.5, 0.5, 0.5, 0.5 * 0.1 ** 0.5, 0.05, 0.05])
    assert Constant(0.3)(10**9) == 0.3


def test_scaled_and_mul():
    s = Cosine(100, warmup_steps=10)
    for scaled in (Scaled(s, 0.25), 0.25 * s, s * 0.25):
        assert isinstance(scaled, Scaled)
        t = torch.arange(0, 150)
        torch.testing.assert_close(scaled.evaluate(t), 0.25 * s.evaluate(t))
    assert Scaled(s, 0.0).evaluate(torch.arange(10)).eq(0).all()


def test_join_uses_local_clocks():
    a, b, c = LinearWarmup(10), Cosine(50), Constant(0.1)
    j = Join((a, b, c), (10, 60))
    for t in range(0, 100):
        want = a(t) if t < 10 else (b(t - 10) if t < 60 else c(t - 60))
        assert j(t) == pytest.approx(want, rel=1e-12, abs=1e-15)
    assert j.phase_boundaries() == [10, 60]


def test_join_truncates_a_schedule_at_the_next_boundary():
    j = Join((Cosine(100), Constant(0.5)), (40,))  # the cosine is cut at 40, before its end
    assert j(39) == pytest.approx(Cosine(100)(39))
    assert j(40) == 0.5 and j(10**6) == 0.5


def test_table_interpolates_and_holds():
    t = Table((10, 20, 40), (1.0, 0.0, 0.5))
    assert [t(0), t(10), t(15), t(20), t(30), t(40), t(1000)] == pytest.approx(
        [1.0, 1.0, 0.5, 0.0, 0.25, 0.5, 0.5])
    import numpy as np

    t2 = Table(np.array([0, 10]), torch.tensor([0.0, 1.0]))
    assert t2.steps == (0.0, 10.0) and t2(5) == 0.5


def test_end_step_and_phase_boundaries():
    assert WSD(warmup_steps=10, total_steps=100).end_step == 100
    assert math.isinf(InverseSqrt(10).end_step)
    assert Constant().end_step == 0
    assert Cosine(100, warmup_steps=10).phase_boundaries() == [10, 100]
    assert Table((0, 5), (1, 2)).phase_boundaries() == []


def test_infinite_with_anneal():
    base = Infinite(100, 400, 0.3)
    ann = base.with_anneal(1000, 200)
    assert ann.anneal_start == 1000 and ann.anneal_steps == 200
    t = torch.arange(0, 1000)
    torch.testing.assert_close(ann.evaluate(t), base.evaluate(t))
    assert ann(1200) == pytest.approx(base.min_ratio)


def test_rewarm_cycles():
    r = Rewarm((100, 100), peaks=(1.0, 0.5), warmup_steps=(10, 20), min_ratio=0.1,
               decay_shape="linear", start_factor=None)
    assert [r(0), r(10), r(99), r(100), r(120), r(200)] == pytest.approx(
        [0.0, 1.0, 0.1 + 0.9 / 90, 0.1, 0.5, 0.05])
    r0 = Rewarm((100, 100), warmup_steps=(10, 20), min_ratio=0.1, start_factor=0.0)
    assert r0(100) == 0.0 and r0(120) == 1.0


# -- bad input ----------------------------------------------------------------------------------

BAD = [
    # negative or non-finite lengths
    (lambda: Cosine(-1), "total_steps must be an integer >= 1"),
    (lambda: Cosine(0), "total_steps must be an integer >= 1"),
    (lambda: Cosine(math.inf), "total_steps must be an integer >= 1"),
    (lambda: Cosine(10.5), "total_steps must be an integer >= 1"),
    (lambda: Cosine(100, warmup_steps=-5), "warmup_steps must be an integer >= 0"),
    (lambda: Cosine(100, warmup_steps=math.nan), "warmup_steps must be an integer >= 0"),
    (lambda: LinearWarmup(-1), "warmup_steps must be an integer >= 0"),
    (lambda: LinearDecay(True), "total_steps must be an integer >= 1"),
    (lambda: CosineRestarts(0), r"period must be in \(0, inf\]"),
    (lambda: CosineRestarts(math.inf), "period must be a finite number"),
    (lambda: CosineRestarts(10, cycles=0), "cycles must be an integer >= 1"),
    (lambda: CosineRestarts(10, t_mult=0.5), r"t_mult must be in \[1, inf\]"),
    (lambda: StepDecay(0), "step_size must be an integer >= 1"),
    (lambda: Exponential(0.9, transition_steps=0), "transition_steps must be an integer >= 1"),
    (lambda: Exponential(0.9, transition_begin=-1), "transition_begin must be an integer >= 0"),
    (lambda: InverseSqrt(10, timescale=0), r"timescale must be in \(0, inf\]"),
    (lambda: OneCycle(-10), "total_steps must be an integer >= 1"),
    (lambda: WSD(warmup_steps=-1, total_steps=10), "warmup_steps must be an integer >= 0"),
    (lambda: WSD(total_steps=100, decay_steps=-1), "decay_steps must be an integer >= 0"),
    (lambda: Power(0, 1024), r"tokens_per_step must be in \(0, inf\]"),
    (lambda: Power(1e6, -1), r"batch_size must be in \(0, inf\]"),
    (lambda: Power(1e6, 1024, warmup_steps=-3), "warmup_steps must be an integer >= 0"),
    (lambda: Infinite(-1, 10, 0.5), "warmup_steps must be an integer >= 0"),
    (lambda: Infinite(10, -1, 0.5), "cooldown_steps must be an integer >= 0"),
    (lambda: Infinite(10, 10, 0.5, anneal_start=30, anneal_steps=-1),
     "anneal_steps must be an integer >= 0"),
    (lambda: Rewarm((100, -1)), r"cycle_steps\[1\] must be an integer >= 1"),
    (lambda: Rewarm(()), "cycle_steps must name at least one cycle"),
    (lambda: Rewarm((100,), warmup_steps=(-1,)), r"warmup_steps\[0\] must be an integer >= 0"),
    # negative or non-finite factors
    (lambda: Constant(-0.1), r"value must be in \[0, inf\]"),
    (lambda: Constant(math.nan), "value must be a finite number"),
    (lambda: LinearWarmup(10, start_factor=-1), r"start_factor must be in \[0, inf\]"),
    (lambda: LinearWarmup(10, end_factor=math.inf), "end_factor must be a finite number"),
    (lambda: Cosine(100, min_ratio=-0.1), r"min_ratio must be in \[0, 1\]"),
    (lambda: Cosine(100, min_ratio=1.5), r"min_ratio must be in \[0, 1\]"),
    (lambda: Cosine(100, exponent=0), r"exponent must be in \(0, inf\]"),
    (lambda: Cosine(100, warmup_start_factor=-1), r"warmup_start_factor must be in \[0, inf\]"),
    (lambda: CosineRestarts(10, decay=0), r"decay must be in \(0, 1\]"),
    (lambda: CosineRestarts(10, cycles=3, decay=0.5, min_ratio=0.3),
     r"min_ratio must be <= the last cycle's peak decay \*\* \(cycles - 1\) = 0.25"),
    (lambda: LinearDecay(100, min_ratio=math.nan), "min_ratio must be a finite number"),
    (lambda: Polynomial(100, power=-1), r"power must be in \(0, inf\]"),
    (lambda: Polynomial(100, end_ratio=2), r"end_ratio must be in \[0, 1\]"),
    (lambda: StepDecay(10, gamma=0), r"gamma must be in \(0, inf\]"),
    (lambda: StepDecay(10, gamma=-0.5), r"gamma must be in \(0, inf\]"),
    (lambda: MultiStep((10,), gamma=math.inf), "gamma must be a finite number"),
    (lambda: Exponential(-0.9), r"gamma must be in \(0, inf\]"),
    (lambda: Exponential(0.9, staircase=1), "staircase must be a bool"),
    (lambda: InverseSqrt(10, min_ratio=-1), r"min_ratio must be in \[0, 1\]"),
    (lambda: OneCycle(100, pct_start=0), r"pct_start must be in \(0, 1\)"),
    (lambda: OneCycle(100, pct_start=1), r"pct_start must be in \(0, 1\)"),
    (lambda: OneCycle(100, div_factor=0), r"div_factor must be in \(0, inf\]"),
    (lambda: OneCycle(100, final_div_factor=-1), r"final_div_factor must be in \(0, inf\]"),
    (lambda: WSD(total_steps=100, min_ratio=-0.5), r"min_ratio must be in \[0, 1\]"),
    (lambda: WSD(total_steps=100, decay_fraction=1.5), r"decay_fraction must be in \[0, 1\]"),
    (lambda: WSD(total_steps=100, decay_shape="power", decay_power=0),
     r"decay_power must be in \(0, inf\]"),
    (lambda: WSD(total_steps=100, decay_shape="exp-half-life", half_life=-1),
     r"half_life must be in \(0, inf\]"),
    (lambda: REX(100, alpha=1.0), r"alpha must be in \[0, 1\)"),
    (lambda: REX(100, alpha=-0.5), r"alpha must be in \[0, 1\)"),
    (lambda: Power(1e6, 1024, lr_max=0), r"lr_max must be in \(0, inf\]"),
    (lambda: Power(1e6, 1024, a=-4), r"a must be in \(0, inf\]"),
    (lambda: Power(1e6, 1024, b=0.5), r"b must be in \[-inf, 0\)"),
    (lambda: Infinite(10, 10, 0.0), r"const_ratio must be in \(0, 1\]"),
    (lambda: Infinite(10, 10, 0.5, alpha=-1), r"alpha must be in \(0, inf\]"),
    (lambda: Infinite(10, 10, 0.5, min_ratio=0.6, anneal_start=20, anneal_steps=5),
     r"min_ratio must be in \(0, 0.5\]"),
    (lambda: Infinite(10, 10, 0.5, min_ratio=0), r"min_ratio must be in \(0, 1\]"),
    (lambda: Rewarm((100,), peaks=(-1.0,)), r"peaks\[0\] must be in \(0, inf\]"),
    (lambda: Rewarm((100,), start_factor=-1.0), r"start_factor must be in \[0, inf\]"),
    (lambda: Rewarm((100,), min_ratio=2.0), r"min_ratio must be in \[0, 1\]"),
    (lambda: Table((0, 1), (1.0, -1.0)), r"values\[1\] must be in \[0, inf\]"),
    (lambda: Table((0, 1), (1.0, math.nan)), r"values\[1\] must be a finite number"),
    (lambda: Table((-1, 1), (1.0, 1.0)), r"steps\[0\] must be in \[0, inf\]"),
    (lambda: Scaled(Cosine(10), -2.0), r"factor must be in \[0, inf\]"),
    (lambda: Scaled(Cosine(10), math.inf), "factor must be a finite number"),
    # warmup longer than the total
    (lambda: Cosine(100, warmup_steps=101), r"warmup_steps must be <= total_steps \(100\)"),
    (lambda: LinearDecay(100, warmup_steps=200), r"warmup_steps must be <= total_steps"),
    (lambda: Polynomial(100, warmup_steps=200), r"warmup_steps must be <= total_steps"),
    (lambda: REX(100, warmup_steps=200), r"warmup_steps must be <= total_steps"),
    (lambda: WSD(warmup_steps=200, total_steps=100), r"warmup_steps must be <= total_steps"),
    (lambda: WSD(warmup_steps=50, total_steps=100, decay_steps=60),
     r"warmup_steps \+ decay steps \(50 \+ 60\) must be <= total_steps \(100\)"),
    (lambda: Power(1e6, 1024, warmup_steps=200, total_steps=100),
     r"warmup_steps must be <= total_steps"),
    (lambda: Power(1e6, 1024, warmup_steps=50, total_steps=100, decay_steps=60),
     r"warmup_steps \+ decay_steps \(50 \+ 60\) must be <= total_steps \(100\)"),
    (lambda: Rewarm((100,), warmup_steps=(101,)),
     r"warmup_steps\[0\] must be <= cycle_steps\[0\] \(100\)"),
    (lambda: OneCycle(3), "pct_start \\* total_steps leaves an empty phase"),
    (lambda: OneCycle(100, pct_start=0.6, three_phase=True),
     "pct_start \\* total_steps leaves an empty phase"),
    # inconsistent phase specifications
    (lambda: WSD(total_steps=100, stable_steps=10), "give total_steps or stable_steps"),
    (lambda: WSD(total_steps=100, decay_steps=10, decay_fraction=0.1),
     "give decay_steps or decay_fraction"),
    (lambda: WSD(warmup_steps=10), "WSD needs total_steps"),
    (lambda: WSD(stable_steps=10, decay_steps=10, decay_fraction=0.1),
     "decay_fraction needs total_steps"),
    (lambda: Power(1e6, 1024, decay_steps=10), "decay_steps > 0 needs total_steps"),
    (lambda: Infinite(10, 10, 0.5, anneal_start=15, anneal_steps=5),
     r"anneal_start must be >= the end of the cooldown \(20\)"),
    (lambda: Infinite(10, const_ratio=0.5, cooldown_end=30, anneal_start=25, anneal_steps=5),
     r"anneal_start must be >= the end of the cooldown \(30\)"),
    (lambda: Infinite(10, 10, 0.5, cooldown_end=30), "give cooldown_steps .* exactly one"),
    (lambda: Infinite(10, const_ratio=0.5), "give cooldown_steps .* exactly one"),
    (lambda: Infinite(10, const_ratio=0.5, cooldown_end=5), r"cooldown_end must be >= warmup"),
    (lambda: Infinite(10, 10), "const_ratio is required"),
    (lambda: WSD(total_steps=100, decay_rounding="ceil"), "decay_rounding must be one of"),
    (lambda: Infinite(10, 10, 0.5, anneal_start=30), "anneal_steps must be an integer >= 1"),
    (lambda: Infinite(10, 10, 0.5, anneal_start=-30, anneal_steps=5),
     "anneal_start must be an integer >= 0"),
    (lambda: Rewarm((100, 100), peaks=(1.0,)), r"peaks must have one entry per cycle \(2\)"),
    (lambda: Rewarm((100, 100), warmup_steps=(1, 2, 3)),
     r"warmup_steps must have one entry per cycle \(2\)"),
    (lambda: Table((0, 1, 2), (1.0, 2.0)), "steps and values must be non-empty and of equal"),
    (lambda: Table((), ()), "steps and values must be non-empty"),
    # overlapping or unordered boundaries and milestones
    (lambda: MultiStep((30, 10)), "milestones must be strictly increasing"),
    (lambda: MultiStep((10, 10)), "milestones must be strictly increasing"),
    (lambda: MultiStep((0, 10)), r"milestones\[0\] must be an integer >= 1"),
    (lambda: MultiStep((10, -20)), r"milestones\[1\] must be an integer >= 1"),
    (lambda: Join((Cosine(10), Cosine(10), Cosine(10)), (20, 10)),
     "boundaries must be strictly increasing"),
    (lambda: Join((Cosine(10), Cosine(10), Cosine(10)), (10, 10)),
     "boundaries must be strictly increasing"),
    (lambda: Join((Cosine(10), Cosine(10)), (0,)), r"boundaries\[0\] must be an integer >= 1"),
    (lambda: Join((Cosine(10), Cosine(10)), (5.5,)), r"boundaries\[0\] must be an integer >= 1"),
    (lambda: Join((Cosine(10), Cosine(10)), (5, 6)), "boundaries must have len"),
    (lambda: Join((), ()), "schedules must not be empty"),
    (lambda: Join((Cosine(10), lambda t: 1.0), (5,)), r"schedules\[1\] must be a fastsched"),
    (lambda: Scaled(lambda t: 1.0, 2.0), "schedule must be a fastsched Schedule"),
    # unknown shape names
    (lambda: WSD(total_steps=100, decay_shape="sqrt"), "decay_shape must be one of"),
    (lambda: WSD(total_steps=100, warmup_shape="exp"), "warmup_shape must be one of"),
    (lambda: WSD(total_steps=100, decay_shape="exp"),
     r"decay_shape='exp' .* needs min_ratio in \(0, 1\]"),
    (lambda: WSD(total_steps=100, decay_shape="exp-half-life"), "needs half_life > 0"),
    (lambda: OneCycle(100, anneal_strategy="cosine"), "anneal_strategy must be one of"),
    (lambda: Infinite(10, 10, 0.5, cooldown_shape="1-sqrt"), "cooldown_shape must be one of"),
    (lambda: Power(1e6, 1024, total_steps=100, decay_steps=10, decay_shape="step"),
     "decay_shape must be one of"),
    (lambda: Rewarm((100,), decay_shape="poly"), "decay_shape must be one of"),
    # unsorted table steps
    (lambda: Table((0, 20, 10), (1.0, 2.0, 3.0)), r"steps must be strictly increasing; steps\[2\]"),
    (lambda: Table((0, 0), (1.0, 2.0)), "steps must be strictly increasing"),
    (lambda: Table((0, math.inf), (1.0, 2.0)), r"steps\[1\] must be a finite number"),
]


@pytest.mark.parametrize("make,match", BAD, ids=[m[:40] for _, m in BAD])
def test_bad_input_raises_value_error_naming_the_argument(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_from_dict_rejects_unknown_kinds():
    with pytest.raises(ValueError, match="kind must be one of"):
        from_dict({"kind": "triangle"})
    with pytest.raises(ValueError, match="expected a dict with a 'kind' key"):
        from_dict({"total_steps": 10})


# -- serialisation, repr, pickling --------------------------------------------------------------

@pytest.mark.parametrize("name,sched", CASES, ids=IDS)
def test_to_dict_from_dict_round_trip(name, sched):
    d = sched.to_dict()
    assert d["kind"] == sched.kind
    back = from_dict(d)
    assert back == sched and type(back) is type(sched)
    via_json = from_dict(json.loads(json.dumps(d)))
    assert via_json == sched
    t = torch.tensor(boundary_steps(sched) + [10**7])
    assert torch.equal(via_json.evaluate(t), sched.evaluate(t))


@pytest.mark.parametrize("name,sched", CASES, ids=IDS)
def test_pickle_round_trip(name, sched):
    sched.table()  # populate the caches: they must not be pickled
    sched(3)
    back = pickle.loads(pickle.dumps(sched))
    assert back == sched
    assert "_tables" not in back.__dict__ and "_rows" not in back.__dict__
    t = torch.tensor(boundary_steps(sched))
    assert torch.equal(back.evaluate(t), sched.evaluate(t))
    assert back(7) == sched(7)


@pytest.mark.parametrize("name,sched", CASES, ids=IDS)
def test_repr_is_readable(name, sched):
    r = repr(sched)
    assert r.startswith(type(sched).__name__ + "(")
    assert len(r) < 400 and "\n" not in r
    if not isinstance(sched, Table):
        # every non-default field is shown, and the repr evaluates back to an equal schedule
        ns = {cls.__name__: cls for cls in REGISTRY.values()}
        assert eval(r, {"inf": math.inf}, ns) == sched


def test_repr_shows_only_non_defaults():
    r = repr(WSD(warmup_steps=100, total_steps=1000))
    assert r == "WSD(warmup_steps=100, total_steps=1000)"
    assert repr(Cosine(100) * 0.5) == "Scaled(schedule=Cosine(total_steps=100), factor=0.5)"
    assert repr(Table((0, 10, 20), (1, 2, 3))) == "Table(n=3, steps=[0..20])"


def test_schedules_are_hashable_values():
    assert hash(Cosine(100)) == hash(Cosine(100))
    assert {Cosine(100), Cosine(100), Cosine(200)} == {Cosine(100), Cosine(200)}
    with pytest.raises(AttributeError):
        Cosine(100).total_steps = 5


def test_base_class_is_abstract():
    with pytest.raises(TypeError, match="abstract"):
        Schedule()

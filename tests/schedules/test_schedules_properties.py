"""Property tests on random valid parameters (hypothesis).

For every schedule family: values are finite and non-negative; the curve is continuous at the
phase boundaries where the family is continuous; warmups do not decrease and decays do not
increase. A last property checks host, torch and Triton agreement (and serialisation) on random
parameters of every family.

Continuity at a boundary ``b``: the segment table evaluated just left of it (at the real step
``b - 1e-6``) equals its value at ``b``. (Comparing integer-step differences cannot tell a jump
from a steep end: a 3-step power-4 decay ends with a step 4.3x its previous one.)
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import pytest
import torch
from fastsched.kernels.schedule import evaluate_schedule
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schedule_cases import boundary_steps, horizon

from fastsched.schedules import (
    DECAY_SHAPES,
    REX,
    WARMUP_SHAPES,
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
    StepDecay,
    Table,
    evaluate_table,
    from_dict,
)

SETTINGS = settings(max_examples=40, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])

phase = st.integers(3, 400)  # a phase long enough to test continuity on
maybe_phase = st.one_of(st.just(0), phase)
ratio = st.one_of(st.just(0.0), st.floats(0.0, 1.0))
pos_ratio = st.floats(0.01, 1.0)
start_factor = st.one_of(st.just(0.0), st.floats(0.0, 1.0))
exponent = st.floats(0.5, 4.0)
decaying_gamma = st.floats(0.05, 1.0)


@dataclass
class Case:
    sched: Schedule
    #: (lo, hi, direction): f is non-decreasing (+1) or non-increasing (-1) on steps lo..hi
    monotone: list[tuple[int, int, int]] = field(default_factory=list)
    #: steps at which the curve must be continuous
    continuous: list[int] = field(default_factory=list)

    def __repr__(self):
        return f"Case({self.sched!r})"


def warm_then_decay(sched: Schedule, w: int) -> Case:
    return Case(sched, [(0, w, +1), (w, horizon(sched), -1)], sched.phase_boundaries())


@st.composite
def cosine_like(draw):
    w, d = draw(maybe_phase), draw(phase)
    r, s = draw(ratio), draw(start_factor)
    kind = draw(st.sampled_from(["cosine", "linear", "poly", "rex", "inv_sqrt"]))
    if kind == "cosine":
        sched = Cosine(w + d, warmup_steps=w, min_ratio=r, warmup_start_factor=s,
                       exponent=draw(exponent))
    elif kind == "linear":
        sched = LinearDecay(w + d, warmup_steps=w, min_ratio=r, warmup_start_factor=s)
    elif kind == "poly":
        sched = Polynomial(w + d, power=draw(exponent), warmup_steps=w, end_ratio=r,
                           warmup_start_factor=s)
    elif kind == "rex":
        sched = REX(w + d, alpha=draw(st.floats(0.0, 0.95)), warmup_steps=w, min_ratio=r,
                    warmup_start_factor=s)
    else:
        tau = draw(st.one_of(st.none(), st.floats(1.0, 2000.0)))
        sched = InverseSqrt(w, timescale=tau, min_ratio=r, warmup_start_factor=s)
    return warm_then_decay(sched, w)


@st.composite
def linear_warmup(draw):
    w = draw(maybe_phase)
    s = draw(start_factor)
    e = draw(st.floats(s, 2.0))
    sched = LinearWarmup(w, start_factor=s, end_factor=e)
    return Case(sched, [(0, horizon(sched), +1)], sched.phase_boundaries())


@st.composite
def wsd(draw):
    shape = draw(st.sampled_from(DECAY_SHAPES))
    r = draw(pos_ratio if shape == "exp" else ratio)
    w, d = draw(maybe_phase), draw(maybe_phase)
    kw = dict(warmup_steps=w, decay_shape=shape, min_ratio=r,
              warmup_shape=draw(st.sampled_from(WARMUP_SHAPES)),
              warmup_start_factor=draw(start_factor), decay_power=draw(exponent),
              half_life=draw(st.floats(max(d, 8) / 8, 2.0 * max(d, 8))))
    if draw(st.booleans()):
        sched = WSD(stable_steps=draw(maybe_phase), decay_steps=d, **kw)
    else:
        total = w + d + draw(st.integers(1, 400))
        if draw(st.booleans()):
            sched = WSD(total_steps=total, decay_steps=d, **kw)
        else:  # a decay fraction; int(frac * total) may leave a decay of 1 or 2 steps
            frac = draw(st.floats(0.0, (total - w) / total))
            sched = WSD(total_steps=total, decay_fraction=frac, **kw)
            dd = sched.segments()
            if any(0 < s.length < 3 for s in dd if math.isfinite(s.length)):
                return Case(sched, [(0, w, +1), (w, horizon(sched), -1)], [])
    return warm_then_decay(sched, w)


@st.composite
def power(draw):
    kw = dict(tokens_per_step=draw(st.floats(1e3, 1e7)), batch_size=draw(st.floats(1, 4096)),
              lr_max=draw(st.floats(1e-4, 0.1)), a=draw(st.floats(0.5, 10.0)),
              b=draw(st.floats(-1.0, -0.1)), warmup_steps=draw(maybe_phase))
    if draw(st.booleans()):
        shape = draw(st.sampled_from(DECAY_SHAPES))
        d = draw(phase)
        kw.update(total_steps=kw["warmup_steps"] + d + draw(st.integers(0, 2000)),
                  decay_steps=d, decay_shape=shape,
                  min_ratio=draw(pos_ratio if shape == "exp" else ratio),
                  half_life=draw(st.floats(d / 8, 2.0 * d)), decay_power=draw(exponent))
    sched = Power(**kw)
    return warm_then_decay(sched, kw["warmup_steps"])


@st.composite
def infinite(draw):
    w, cd = draw(maybe_phase), draw(phase)  # no cooldown would be a jump from 1 to const_ratio
    c = draw(st.floats(0.01, 1.0))
    kw = dict(cooldown_shape=draw(st.sampled_from(["cosine", "inv-sqrt"])),
              alpha=draw(st.floats(0.5, 20.0)))
    if draw(st.booleans()):
        kw.update(anneal_start=w + cd + draw(st.integers(0, 500)), anneal_steps=draw(phase),
                  min_ratio=draw(st.floats(1e-4, c)))
    sched = Infinite(w, cd, c, **kw)
    return warm_then_decay(sched, w)


@st.composite
def one_cycle(draw):
    total = draw(st.integers(200, 3000))
    three = draw(st.booleans())
    pct = draw(st.floats(0.05, 0.45 if three else 0.95))
    sched = OneCycle(total, pct_start=pct, anneal_strategy=draw(st.sampled_from(["cos",
                                                                                 "linear"])),
                     div_factor=draw(st.floats(1.5, 100.0)),
                     final_div_factor=draw(st.floats(1.0, 1e4)), three_phase=three)
    peak = pct * total - 1
    return Case(sched, [(0, math.floor(peak), +1), (math.ceil(peak), total + 10, -1)],
                [math.ceil(b) for b in sched.phase_boundaries()])


@st.composite
def step_like(draw):
    gamma = draw(decaying_gamma)
    kind = draw(st.sampled_from(["step", "multistep", "exp"]))
    if kind == "step":
        return Case(StepDecay(draw(st.integers(1, 300)), gamma=gamma), [(0, 3000, -1)])
    if kind == "multistep":
        ms = draw(st.lists(st.integers(1, 2000), min_size=1, max_size=6, unique=True))
        return Case(MultiStep(sorted(ms), gamma=gamma), [(0, 3000, -1)])
    stair = draw(st.booleans())
    sched = Exponential(gamma, transition_steps=draw(st.integers(1, 200)), staircase=stair,
                        transition_begin=draw(maybe_phase))
    return Case(sched, [(0, 3000, -1)], [] if stair else sched.phase_boundaries())


@st.composite
def restarts(draw):
    w, cycles, decay = draw(maybe_phase), draw(st.integers(1, 6)), draw(st.floats(0.1, 1.0))
    r = draw(ratio) * decay ** (cycles - 1)  # the floor is below every cycle's peak
    sched = CosineRestarts(draw(st.floats(3.0, 300.0)), cycles=cycles,
                           t_mult=draw(st.floats(1.0, 2.5)), min_ratio=r,
                           decay=decay, warmup_steps=w,
                           warmup_start_factor=draw(start_factor))
    starts = [s.start for s in sched.segments()]
    mono = [(0, w, +1)] + [(math.ceil(a), math.floor(b) - 1, -1)
                           for a, b in zip(starts[w > 0:], starts[(w > 0) + 1:])]
    return Case(sched, mono, [w] if w else [])


@st.composite
def rewarm(draw):
    n = draw(st.integers(1, 4))
    cycles, warm = [], []
    for _ in range(n):
        c = draw(st.integers(6, 400))
        cycles.append(c)
        warm.append(draw(st.one_of(st.just(0), st.just(c), st.integers(3, c - 3))))
    shape = draw(st.sampled_from(DECAY_SHAPES))
    start = draw(st.one_of(st.none(), st.floats(0.0, 0.5)))
    sched = Rewarm(tuple(cycles), peaks=tuple(draw(st.floats(0.1, 2.0)) for _ in range(n)),
                   warmup_steps=tuple(warm), min_ratio=draw(pos_ratio if shape == "exp"
                                                            else ratio),
                   decay_shape=shape, start_factor=start, decay_power=draw(exponent),
                   half_life=draw(st.floats(5.0, 500.0)))
    mono, cont, t0 = [], [], 0
    for c, w, peak in zip(cycles, warm, sched.peaks):
        if w:  # the re-warmup goes from its start value to the peak, whichever is larger
            mono.append((t0, min(t0 + w, t0 + c - 1), +1 if peak >= sched(t0) else -1))
            if start is None and t0 > 0:
                cont.append(t0)  # continues from where the last cycle ended
            if w < c:
                cont.append(t0 + w)  # the decay starts at the peak
        mono.append((t0 + w, t0 + c - 1, -1))
        t0 += c
    return Case(sched, mono, cont)


@st.composite
def table(draw):
    n = draw(st.integers(1, 8))
    gaps = draw(st.lists(st.integers(3, 300), min_size=n - 1, max_size=n - 1))
    steps = [draw(st.integers(0, 100))]
    for g in gaps:
        steps.append(steps[-1] + g)
    values = draw(st.lists(st.floats(0.0, 2.0), min_size=n, max_size=n))
    if draw(st.booleans()):
        values.sort(reverse=True)
        mono = [(0, steps[-1] + 100, -1)]
    else:
        mono = []
    sched = Table(tuple(steps), tuple(values))
    return Case(sched, mono, [s for s in steps if s > 0])


@st.composite
def composed(draw):
    w, d = draw(phase), draw(phase)
    r, s = draw(ratio), draw(start_factor)
    sched = Join((LinearWarmup(w, start_factor=s), Cosine(d, min_ratio=r), Constant(r)),
                 (w, w + d))
    base = warm_then_decay(sched, w)
    k = draw(st.floats(0.0, 10.0))
    if draw(st.booleans()):
        return Case(Scaled(sched, k), base.monotone, base.continuous)
    return base


FAMILIES = {
    "cosine-like": cosine_like(), "linear-warmup": linear_warmup(), "wsd": wsd(),
    "power": power(), "infinite": infinite(), "one-cycle": one_cycle(), "step": step_like(),
    "restarts": restarts(), "rewarm": rewarm(), "table": table(), "composed": composed(),
}
any_case = st.one_of(*FAMILIES.values())


def values(sched: Schedule, hi: int) -> torch.Tensor:
    return sched.evaluate(torch.arange(0, hi + 3))


def check_finite_non_negative(case: Case) -> None:
    hi = horizon(case.sched)
    f = values(case.sched, 3 * hi)
    far = case.sched.evaluate(torch.tensor([10 * hi, 10**9, 2**40]))
    for v in (f, far):
        assert torch.isfinite(v).all(), case
        assert (v >= 0).all(), case


def check_continuity(case: Case) -> None:
    """At a boundary declared continuous, the value just left of it (the segment table
    evaluated at b - 1e-6, a real step) equals the value at b. Differences of integer steps
    cannot tell: a 3-step power-4 decay ends with its steepest step (0.80 after 0.19 and 0.01)
    and is continuous all the same."""
    hi = horizon(case.sched)
    f = values(case.sched, hi + 3).tolist()
    scale = max(abs(x) for x in f) + 1e-300
    table = case.sched.table()
    for b in case.continuous:
        b = float(b)
        if b < 1:
            continue
        left, at = evaluate_table(table, torch.tensor([b - 1e-6, b], dtype=torch.float64))
        # the slope of any shape is at most ~scale * (power or 1 / alpha) per step: 1e-6 of a
        # step moves it by far less than 1e-3 of the scale; a real jump is of order the scale
        assert abs(float(left) - float(at)) <= 1e-3 * scale, (case, b, float(left), float(at))


def check_monotone(case: Case) -> None:
    hi = max([horizon(case.sched)] + [h for _, h, _ in case.monotone])
    f = values(case.sched, hi)
    scale = float(f.abs().max()) + 1e-300
    for lo, h, direction in case.monotone:
        if h <= lo:
            continue
        d = torch.diff(f[lo:h + 1]) * direction
        assert (d >= -1e-12 * scale).all(), (case, lo, h, direction)


@SETTINGS
@given(case=any_case)
def test_finite_and_non_negative(case):
    check_finite_non_negative(case)


@SETTINGS
@given(case=any_case)
def test_continuous_at_phase_boundaries(case):
    check_continuity(case)


@SETTINGS
@given(case=any_case)
def test_warmups_rise_and_decays_fall(case):
    check_monotone(case)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=any_case, seed=st.integers(0, 2**31))
def test_host_torch_and_triton_agree_on_random_parameters(case, seed):
    from conftest import KERNEL_DEVICE

    sched = case.sched
    g = torch.Generator().manual_seed(seed)
    steps = torch.cat([torch.tensor(boundary_steps(sched)),
                       torch.randint(0, 3 * horizon(sched), (200,), generator=g),
                       torch.tensor([10**9])])
    vec = sched.evaluate(steps)
    host = torch.tensor([sched(t) for t in steps.tolist()], dtype=torch.float64)
    kern = evaluate_schedule(sched.table(KERNEL_DEVICE), steps.to(KERNEL_DEVICE)).cpu()
    torch.testing.assert_close(host, vec, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(kern, vec, rtol=1e-6, atol=1e-12)
    back = from_dict(json.loads(json.dumps(sched.to_dict())))
    assert back == sched and torch.equal(back.evaluate(steps), vec)


def test_the_checks_pass_a_good_curve_and_catch_jumps_and_bumps():
    good = Case(Cosine(100, warmup_steps=10), [(0, 10, +1), (10, 200, -1)], [10, 100])
    check_continuity(good)
    check_monotone(good)
    with pytest.raises(AssertionError):
        check_continuity(Case(Join((Constant(1.0), Constant(0.5)), (50,)), [], [50]))
    with pytest.raises(AssertionError):
        check_monotone(Case(Table((0, 10, 20), (1.0, 0.5, 0.8)), [(0, 30, -1)], []))


def test_infinite_without_anneal_accepts_a_small_constant():
    # min_ratio only bounds the anneal; without one a const_ratio below its default is valid
    assert Infinite(10, 10, 5e-4)(10**6) == 5e-4

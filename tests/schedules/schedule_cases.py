"""A catalogue of schedule parameterisations shared by the schedule tests.

Every named schedule appears several times: with and without warmup, with a zero and a positive
floor, every WSD decay and warmup shape, the power scheduler with and without its final decay,
infinite schedules with both cooldowns with and without the anneal, re-warming from the previous
cycle's end and from 0, tables, joins and scaled schedules.
"""

from __future__ import annotations

import math

import torch

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
)

#: tokens per step and batch size of IBM's power-scheduler configuration (1024 x 4096 tokens)
_POWER = dict(tokens_per_step=4096 * 1024, batch_size=1024, lr_max=0.02, a=4.0, b=-0.51)


def _wsd_cases() -> list[tuple[str, Schedule]]:
    out = [("wsd-default", WSD(warmup_steps=100, total_steps=1000))]
    for shape in DECAY_SHAPES:
        extra = {"half_life": 40.0} if shape == "exp-half-life" else {}
        if shape == "power":
            extra = {"decay_power": 3.0}
        for r in (0.0, 0.1):
            if shape == "exp" and r == 0:
                continue  # geometric interpolation needs a positive floor
            out.append((f"wsd-{shape}-r{r}", WSD(warmup_steps=50, total_steps=1000,
                                                 decay_steps=200, decay_shape=shape,
                                                 min_ratio=r, **extra)))
    for shape in WARMUP_SHAPES:
        out.append((f"wsd-warmup-{shape}", WSD(warmup_steps=64, total_steps=640,
                                               decay_fraction=0.2, warmup_shape=shape,
                                               warmup_start_factor=0.1, decay_shape="cosine",
                                               min_ratio=0.05)))
    out += [
        ("wsd-no-warmup", WSD(total_steps=1000, decay_shape="linear")),
        ("wsd-stable-form", WSD(warmup_steps=10, stable_steps=500, decay_steps=100,
                                decay_shape="exp", min_ratio=0.01)),
        ("wsd-no-decay", WSD(warmup_steps=30, total_steps=300, decay_steps=0)),
        ("wsd-all-decay", WSD(total_steps=300, decay_steps=300, decay_shape="square")),
        # 0.1 * 1006 = 100.6: 100 decay steps (epfml's truncation) or 101 (rounded)
        ("wsd-fraction-floor", WSD(warmup_steps=20, total_steps=1006)),
        ("wsd-fraction-round", WSD(warmup_steps=20, total_steps=1006, decay_rounding="round")),
    ]
    return out


def catalogue() -> list[tuple[str, Schedule]]:
    """``(id, schedule)`` pairs covering every schedule class."""
    cases: list[tuple[str, Schedule]] = [
        ("constant", Constant()),
        ("constant-0.3", Constant(0.3)),
        ("linear-warmup-0", LinearWarmup(0)),
        ("linear-warmup", LinearWarmup(100)),
        ("linear-warmup-factors", LinearWarmup(37, start_factor=0.1, end_factor=0.8)),
        ("cosine", Cosine(1000)),
        ("cosine-warmup-floor", Cosine(1000, warmup_steps=100, min_ratio=0.1)),
        ("cosine-exponent", Cosine(777, min_ratio=0.05, exponent=2.0)),
        ("cosine-all-warmup", Cosine(500, warmup_steps=500, warmup_start_factor=0.2)),
        ("cosine-one-step", Cosine(1)),
        ("restarts", CosineRestarts(100, cycles=5)),
        ("restarts-mult", CosineRestarts(50, cycles=4, t_mult=2.0, min_ratio=0.1, decay=0.7,
                                         warmup_steps=20, warmup_start_factor=0.05)),
        ("restarts-fractional-period", CosineRestarts(33.5, cycles=3, t_mult=1.5)),
        ("linear-decay", LinearDecay(1000)),
        ("linear-decay-floor", LinearDecay(1000, warmup_steps=100, min_ratio=0.1,
                                           warmup_start_factor=0.01)),
        ("poly-2", Polynomial(1000, power=2.0)),
        ("poly-sqrt-warmup", Polynomial(1000, power=0.5, warmup_steps=50, end_ratio=1e-4)),
        ("step", StepDecay(30)),
        ("step-half", StepDecay(7, gamma=0.5)),
        ("multistep", MultiStep((100, 300, 700))),
        ("multistep-dense", MultiStep((1, 2, 3), gamma=0.5)),
        ("exponential", Exponential(0.99)),
        ("exponential-staircase", Exponential(0.5, transition_steps=100, staircase=True,
                                              transition_begin=50)),
        ("exponential-smooth", Exponential(0.9, transition_steps=10)),
        ("inv-sqrt", InverseSqrt()),
        ("inv-sqrt-warmup", InverseSqrt(100)),
        ("inv-sqrt-floor", InverseSqrt(100, timescale=500.0, min_ratio=0.1,
                                       warmup_start_factor=0.1)),
        ("one-cycle", OneCycle(1000)),
        ("one-cycle-linear", OneCycle(1000, anneal_strategy="linear")),
        ("one-cycle-3", OneCycle(997, pct_start=0.25, three_phase=True)),
        ("one-cycle-3-linear", OneCycle(1000, three_phase=True, anneal_strategy="linear",
                                        div_factor=10.0, final_div_factor=100.0)),
        *_wsd_cases(),
        ("rex", REX(1000)),
        ("rex-generalised", REX(1000, alpha=0.1, warmup_steps=100, min_ratio=0.05)),
        ("rex-alpha0", REX(1000, alpha=0.0)),
        ("power", Power(**_POWER, warmup_steps=100)),
        ("power-no-warmup", Power(**_POWER)),
        ("power-decay", Power(**_POWER, warmup_steps=100, total_steps=5000, decay_steps=500)),
        ("power-decay-exp", Power(**_POWER, warmup_steps=100, total_steps=5000, decay_steps=500,
                                  decay_shape="exp", min_ratio=0.1)),
        ("power-decay-1-sqrt", Power(**_POWER, total_steps=3000, decay_steps=300,
                                     decay_shape="1-sqrt")),
        ("infinite-cos", Infinite(100, 400, 0.3)),
        ("infinite-inv-sqrt", Infinite(100, 400, 0.3, cooldown_shape="inv-sqrt", alpha=8.0)),
        ("infinite-inv-sqrt-default", Infinite(100, 400, 0.3, cooldown_shape="inv-sqrt")),
        ("infinite-linear", Infinite(100, 400, 0.3, cooldown_shape="linear")),
        ("infinite-cooldown-end", Infinite(50, const_ratio=0.4, cooldown_end=450,
                                           cooldown_shape="inv-sqrt", anneal_start=900,
                                           anneal_steps=100, min_ratio=0.01)),
        ("infinite-cos-anneal", Infinite(100, 400, 0.3, anneal_start=2000, anneal_steps=300,
                                         min_ratio=1e-3)),
        ("infinite-inv-sqrt-anneal", Infinite(0, 500, 0.25, cooldown_shape="inv-sqrt",
                                              alpha=3.0, anneal_start=500, anneal_steps=100,
                                              min_ratio=0.01)),
        ("rewarm-continue", Rewarm((1000, 800, 600), peaks=(1.0, 0.5, 0.8),
                                   warmup_steps=(100, 20, 50), start_factor=None)),
        ("rewarm-from-0", Rewarm((1000, 800), warmup_steps=(10, 80), start_factor=0.0)),
        ("rewarm-linear-0", Rewarm((300, 300, 300), warmup_steps=(30, 30, 300),
                                   min_ratio=0.0, decay_shape="linear")),
        ("rewarm-exp", Rewarm((500, 500), peaks=(1.0, 2.0), warmup_steps=(0, 50),
                              decay_shape="exp", min_ratio=0.1, start_factor=None)),
        ("table", Table((0, 100, 250, 1000), (0.0, 1.0, 0.5, 0.1))),
        ("table-offset", Table((50, 60), (0.5, 1.0))),
        ("table-single", Table((0,), (0.7,))),
        ("table-fractional", Table((10.5, 20.25, 33.3), (1.0, 0.2, 0.4))),
        ("join-warmup-cosine", Join((LinearWarmup(100, start_factor=0.1),
                                     Cosine(900, min_ratio=0.1)), (100,))),
        ("join-three", Join((Constant(0.5), InverseSqrt(10), LinearDecay(500)), (50, 300))),
        ("join-nested", Join((Join((LinearWarmup(20), Constant()), (20,)), REX(200),
                              Exponential(0.98)), (100, 250))),
        ("scaled", Scaled(Cosine(1000, warmup_steps=100), 0.5)),
        ("scaled-mul", 2.0 * WSD(warmup_steps=10, total_steps=200, decay_shape="exp",
                                 min_ratio=0.1)),
        ("scaled-zero", Scaled(Infinite(10, 40, 0.5, anneal_start=100, anneal_steps=50), 0.0)),
    ]
    ids = [c[0] for c in cases]
    assert len(ids) == len(set(ids)), "duplicate case ids"
    return cases


CASES = catalogue()


def boundary_steps(sched: Schedule) -> list[int]:
    """Every phase start and end, +-1 and +-2 around each (clipped at 0)."""
    points: set[int] = {0, 1, 2}
    for seg in sched.segments():
        for edge in (seg.start, seg.start + seg.length):
            if math.isfinite(edge):
                for base in {math.floor(edge), math.ceil(edge)}:
                    points.update(max(0, base + d) for d in (-2, -1, 0, 1, 2))
    return sorted(points)


def horizon(sched: Schedule) -> int:
    """A step range that covers every bounded phase of ``sched`` (at least 1000)."""
    ends = [seg.start + seg.length for seg in sched.segments()
            if math.isfinite(seg.start + seg.length)]
    ends += [seg.start for seg in sched.segments()]
    return max(1000, int(max(ends)) + 1)


def sample_steps(sched: Schedule, n_random: int = 10_000, seed: int = 0) -> torch.Tensor:
    """``n_random`` random steps up to 3x the horizon, every boundary, steps far past the end."""
    g = torch.Generator().manual_seed(seed)
    end = horizon(sched)
    rand = torch.randint(0, 3 * end, (n_random,), generator=g)
    far = torch.tensor([10 * end, 100 * end + 7, 2**24 + 1, 10**9, 2**40], dtype=torch.int64)
    return torch.cat([rand, torch.tensor(boundary_steps(sched), dtype=torch.int64), far])

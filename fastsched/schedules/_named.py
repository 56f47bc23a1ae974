"""The named schedules. Each one is a frozen dataclass that compiles to a segment table.

Conventions (see ``../shared/REFERENCES.md`` in the development tree for sources): ``t`` is the
0-based step, values are multipliers of the optimizer's base learning rate, ``total_steps``
includes the warmup (as in HF transformers and optax), and a warmup is linear from
``warmup_start_factor`` at ``t = 0`` to the peak at ``t = warmup_steps`` (HF: ``t / W``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ._base import Schedule, check_choice, check_float, check_steps, register
from ._core import Segment, Shape, evaluate_rows

__all__ = [
    "Constant", "LinearWarmup", "Cosine", "CosineRestarts", "LinearDecay", "Polynomial",
    "StepDecay", "MultiStep", "Exponential", "InverseSqrt", "OneCycle", "WSD", "REX", "Power",
    "Infinite", "Rewarm", "Table", "Join", "Scaled", "DECAY_SHAPES", "WARMUP_SHAPES",
]

INF = math.inf

#: decay shapes shared by WSD, Power, Rewarm (HF ``get_wsd_schedule``, epfml ``wsd_schedule``,
#: timm ``WSDLRScheduler``): value goes from ``v0`` to ``v1`` over the decay window.
DECAY_SHAPES = ("linear", "cosine", "1-sqrt", "square", "power", "exp", "exp-half-life")
WARMUP_SHAPES = ("linear", "cosine", "1-sqrt")


def _end_value(seg: Segment) -> float:
    """Value of a segment at the end of its window (for the constant that follows it)."""
    if not math.isfinite(seg.length):
        return math.nan
    return evaluate_rows([seg.shifted(-seg.start).as_row()], [0.0], float(seg.length))


class _Builder:
    """Appends segments end to end, skipping empty ones."""

    def __init__(self):
        self.segs: list[Segment] = []
        self.t = 0.0

    def add(self, length: float, shape: Shape, v0: float, v1: float = 0.0, a: float = 1.0,
            b: float = 1.0, c: float = 0.0) -> _Builder:
        if length > 0:
            self.segs.append(Segment(self.t, length, shape, v0, v1, a, b, c))
            self.t += length
        return self

    def warmup(self, steps: int, start: float, peak: float, shape: str = "linear") -> _Builder:
        if shape == "linear":
            return self.add(steps, Shape.LINEAR, start, peak)
        if shape == "cosine":  # 0.5 * (1 - cos(pi p)) from start to peak
            return self.add(steps, Shape.COSINE, start, peak, 1.0)
        return self.add(steps, Shape.POLY, start, peak, 0.5)  # "1-sqrt": 1 - sqrt(1 - p)

    def decay(self, steps: float, v0: float, v1: float, shape: str, *, power: float = 1.0,
              half_life: float | None = None) -> _Builder:
        if shape == "linear":
            return self.add(steps, Shape.LINEAR, v0, v1)
        if shape == "cosine":
            return self.add(steps, Shape.COSINE, v0, v1, 1.0)
        if shape == "1-sqrt":
            return self.add(steps, Shape.POW_DECAY, v0, v1, 0.5)
        if shape == "square":
            return self.add(steps, Shape.POW_DECAY, v0, v1, 2.0)
        if shape == "power":
            return self.add(steps, Shape.POW_DECAY, v0, v1, power)
        if shape == "exp":
            return self.add(steps, Shape.GEOMETRIC, v0, v1)
        # "exp-half-life": v1 + (v0 - v1) * 0.5 ** (x / half_life) (MiniCPM)
        return self.add(steps, Shape.EXP_RATE, v0, v1, 0.5, half_life, 0.0)

    def hold(self, value: float | None = None) -> list[Segment]:
        """Close with a constant (the last segment's end value unless given)."""
        if value is None:
            value = _end_value(self.segs[-1])
        self.segs.append(Segment(self.t, INF, Shape.CONST, value))
        return self.segs


def _check_warmup(warmup_steps, total_steps, name="warmup_steps") -> int:
    w = check_steps(name, warmup_steps)
    if total_steps is not None and w > total_steps:
        raise ValueError(f"{name} must be <= total_steps ({total_steps}), got {w}")
    return w


def _check_decay_shape(shape, min_ratio, half_life, power=1.0):
    check_choice("decay_shape", shape, DECAY_SHAPES)
    if shape == "exp" and min_ratio <= 0:
        raise ValueError("decay_shape='exp' interpolates geometrically and needs min_ratio in "
                         f"(0, 1], got {min_ratio!r}")
    if shape == "exp-half-life":
        if half_life is None:
            raise ValueError("decay_shape='exp-half-life' needs half_life > 0")
        check_float("half_life", half_life, lo=0, lo_open=True)
    if shape == "power":
        check_float("decay_power", power, lo=0, lo_open=True)


# -- classic schedules --------------------------------------------------------------------------

@register
@dataclass(frozen=True, repr=False)
class Constant(Schedule):
    """``f(t) = value`` (HF ``constant``; torch ``ConstantLR`` with ``total_iters=0``)."""

    value: float = 1.0
    kind = "constant"

    def __post_init__(self):
        check_float("value", self.value, lo=0)

    def segments(self):
        return [Segment(0.0, INF, Shape.CONST, self.value)]


@register
@dataclass(frozen=True, repr=False)
class LinearWarmup(Schedule):
    """Linear warmup, then constant: ``f(t) = s + (e - s) * min(t, W) / W``.

    Matches torch ``LinearLR(start_factor=s, end_factor=e, total_iters=W)`` and HF
    ``get_constant_schedule_with_warmup`` (``s = 0``).
    """

    warmup_steps: int
    start_factor: float = 0.0
    end_factor: float = 1.0
    kind = "linear_warmup"

    def __post_init__(self):
        check_steps("warmup_steps", self.warmup_steps)
        check_float("start_factor", self.start_factor, lo=0)
        check_float("end_factor", self.end_factor, lo=0)

    def segments(self):
        return _Builder().add(self.warmup_steps, Shape.LINEAR, self.start_factor,
                              self.end_factor).hold(self.end_factor)


@register
@dataclass(frozen=True, repr=False)
class Cosine(Schedule):
    """Linear warmup, then cosine decay to a floor ``r`` at ``total_steps``, then ``r``.

    ``f(t) = r + (1 - r) * (0.5 * (1 + cos(pi * p))) ** exponent``, ``p = (t - W) / (T - W)``.
    HF ``get_cosine_schedule_with_warmup`` (r = 0) and ``get_cosine_with_min_lr_schedule_with_
    warmup`` (``min_lr_rate = r``); torch ``CosineAnnealingLR(T_max=T, eta_min=r * lr)``; optax
    ``warmup_cosine_decay_schedule`` (``exponent``). Unlike HF, steps past ``T`` hold ``r``.
    """

    total_steps: int
    warmup_steps: int = 0
    min_ratio: float = 0.0
    warmup_start_factor: float = 0.0
    exponent: float = 1.0
    kind = "cosine"

    def __post_init__(self):
        check_steps("total_steps", self.total_steps, allow_zero=False)
        _check_warmup(self.warmup_steps, self.total_steps)
        check_float("min_ratio", self.min_ratio, lo=0, hi=1)
        check_float("warmup_start_factor", self.warmup_start_factor, lo=0)
        check_float("exponent", self.exponent, lo=0, lo_open=True)

    def segments(self):
        return (_Builder().warmup(self.warmup_steps, self.warmup_start_factor, 1.0)
                .add(self.total_steps - self.warmup_steps, Shape.COSINE, 1.0, self.min_ratio,
                     self.exponent)
                .hold(self.min_ratio))


@register
@dataclass(frozen=True, repr=False)
class CosineRestarts(Schedule):
    """SGDR cosine annealing with warm restarts (Loshchilov & Hutter, arXiv 1608.03983).

    Cycle ``i`` lasts ``period * t_mult ** i`` steps and decays from ``decay ** i`` to
    ``min_ratio`` along a cosine. Matches torch ``CosineAnnealingWarmRestarts(T_0=period,
    T_mult, eta_min=min_ratio * lr)`` for ``cycles`` cycles; HF ``get_cosine_with_hard_restarts_
    schedule_with_warmup`` is ``period = (T - W) / num_cycles``. After the last cycle the schedule
    holds ``min_ratio`` (torch restarts forever: pass as many cycles as you need).
    """

    period: float
    cycles: int = 1
    t_mult: float = 1.0
    min_ratio: float = 0.0
    decay: float = 1.0
    warmup_steps: int = 0
    warmup_start_factor: float = 0.0
    kind = "cosine_restarts"

    def __post_init__(self):
        check_float("period", self.period, lo=0, lo_open=True)
        check_steps("cycles", self.cycles, allow_zero=False)
        if self.cycles > 100_000:
            raise ValueError(f"cycles must be <= 100000, got {self.cycles}")
        check_float("t_mult", self.t_mult, lo=1)
        check_float("min_ratio", self.min_ratio, lo=0, hi=1)
        check_float("decay", self.decay, lo=0, lo_open=True, hi=1)
        last_peak = self.decay ** (self.cycles - 1)
        if last_peak < self.min_ratio:  # a cycle would rise from its peak to the floor
            raise ValueError(f"min_ratio must be <= the last cycle's peak decay ** (cycles - 1) "
                             f"= {last_peak:g}, got {self.min_ratio!r}")
        check_steps("warmup_steps", self.warmup_steps)
        check_float("warmup_start_factor", self.warmup_start_factor, lo=0)

    def segments(self):
        b = _Builder().warmup(self.warmup_steps, self.warmup_start_factor, 1.0)
        length, peak = float(self.period), 1.0
        for _ in range(self.cycles):
            b.add(length, Shape.COSINE, peak, self.min_ratio, 1.0)
            length *= self.t_mult
            peak *= self.decay
        return b.hold(self.min_ratio)


@register
@dataclass(frozen=True, repr=False)
class LinearDecay(Schedule):
    """Linear warmup, then linear decay to ``min_ratio`` at ``total_steps``.

    HF ``get_linear_schedule_with_warmup``: ``f = (T - t) / (T - W)``; the default Defazio et al.
    (arXiv 2310.07831) recommend. OLMo-core ``LinearWithWarmup(alpha_f)`` is ``min_ratio=alpha_f``.
    """

    total_steps: int
    warmup_steps: int = 0
    min_ratio: float = 0.0
    warmup_start_factor: float = 0.0
    kind = "linear_decay"

    def __post_init__(self):
        check_steps("total_steps", self.total_steps, allow_zero=False)
        _check_warmup(self.warmup_steps, self.total_steps)
        check_float("min_ratio", self.min_ratio, lo=0, hi=1)
        check_float("warmup_start_factor", self.warmup_start_factor, lo=0)

    def segments(self):
        return (_Builder().warmup(self.warmup_steps, self.warmup_start_factor, 1.0)
                .add(self.total_steps - self.warmup_steps, Shape.LINEAR, 1.0, self.min_ratio)
                .hold(self.min_ratio))


@register
@dataclass(frozen=True, repr=False)
class Polynomial(Schedule):
    """Polynomial decay: ``f = r + (1 - r) * (1 - p) ** power``, ``p = (t - W) / (T - W)``.

    torch ``PolynomialLR(total_iters=T, power)`` (``r = 0, W = 0``); HF
    ``get_polynomial_decay_schedule_with_warmup`` (``r = lr_end / lr``).
    """

    total_steps: int
    power: float = 1.0
    warmup_steps: int = 0
    end_ratio: float = 0.0
    warmup_start_factor: float = 0.0
    kind = "polynomial"

    def __post_init__(self):
        check_steps("total_steps", self.total_steps, allow_zero=False)
        check_float("power", self.power, lo=0, lo_open=True)
        _check_warmup(self.warmup_steps, self.total_steps)
        check_float("end_ratio", self.end_ratio, lo=0, hi=1)
        check_float("warmup_start_factor", self.warmup_start_factor, lo=0)

    def segments(self):
        return (_Builder().warmup(self.warmup_steps, self.warmup_start_factor, 1.0)
                .add(self.total_steps - self.warmup_steps, Shape.POLY, 1.0, self.end_ratio,
                     self.power)
                .hold(self.end_ratio))


@register
@dataclass(frozen=True, repr=False)
class StepDecay(Schedule):
    """``f(t) = gamma ** (t // step_size)`` (torch ``StepLR``; timm ``StepLRScheduler``)."""

    step_size: int
    gamma: float = 0.1
    kind = "step"

    def __post_init__(self):
        check_steps("step_size", self.step_size, allow_zero=False)
        check_float("gamma", self.gamma, lo=0, lo_open=True)

    def segments(self):
        return [Segment(0.0, INF, Shape.EXP_RATE, 1.0, 0.0, self.gamma, float(self.step_size),
                        1.0)]


@register
@dataclass(frozen=True, repr=False)
class MultiStep(Schedule):
    """``f(t) = gamma ** (number of milestones <= t)`` (torch ``MultiStepLR``)."""

    milestones: tuple[int, ...]
    gamma: float = 0.1
    kind = "multistep"

    def __post_init__(self):
        object.__setattr__(self, "milestones", tuple(self.milestones))
        prev = 0
        for i, m in enumerate(self.milestones):
            check_steps(f"milestones[{i}]", m, allow_zero=False)
            if m <= prev and i > 0:
                raise ValueError(f"milestones must be strictly increasing, got {self.milestones}")
            prev = m
        check_float("gamma", self.gamma, lo=0, lo_open=True)

    def segments(self):
        segs = [Segment(0.0, INF, Shape.CONST, 1.0)]
        for k, m in enumerate(self.milestones, start=1):
            segs.append(Segment(float(m), INF, Shape.CONST, self.gamma ** k))
        return segs


@register
@dataclass(frozen=True, repr=False)
class Exponential(Schedule):
    """``f(t) = gamma ** ((t - begin) / transition_steps)`` for ``t >= begin``, 1 before.

    torch ``ExponentialLR(gamma)`` (``transition_steps=1``); optax ``exponential_decay`` with
    ``decay_rate=gamma`` (``staircase`` floors the exponent).
    """

    gamma: float
    transition_steps: int = 1
    staircase: bool = False
    transition_begin: int = 0
    kind = "exponential"

    def __post_init__(self):
        check_float("gamma", self.gamma, lo=0, lo_open=True)
        check_steps("transition_steps", self.transition_steps, allow_zero=False)
        if not isinstance(self.staircase, bool):
            raise ValueError(f"staircase must be a bool, got {self.staircase!r}")
        check_steps("transition_begin", self.transition_begin)

    def segments(self):
        b = _Builder().add(self.transition_begin, Shape.CONST, 1.0)
        b.segs.append(Segment(b.t, INF, Shape.EXP_RATE, 1.0, 0.0, self.gamma,
                              float(self.transition_steps), 1.0 if self.staircase else 0.0))
        return b.segs


@register
@dataclass(frozen=True, repr=False)
class InverseSqrt(Schedule):
    """Linear warmup, then ``f = r + (1 - r) / sqrt(1 + (t - W) / timescale)``.

    HF ``get_inverse_sqrt_schedule`` (``r = 0``; ``timescale`` defaults to ``W``, or 10 000 when
    ``W = 0``, as there).
    """

    warmup_steps: int = 0
    timescale: float | None = None
    min_ratio: float = 0.0
    warmup_start_factor: float = 0.0
    kind = "inverse_sqrt"

    def __post_init__(self):
        check_steps("warmup_steps", self.warmup_steps)
        if self.timescale is not None:
            check_float("timescale", self.timescale, lo=0, lo_open=True)
        check_float("min_ratio", self.min_ratio, lo=0, hi=1)
        check_float("warmup_start_factor", self.warmup_start_factor, lo=0)

    def segments(self):
        tau = self.timescale if self.timescale is not None else (self.warmup_steps or 10_000)
        b = _Builder().warmup(self.warmup_steps, self.warmup_start_factor, 1.0)
        b.segs.append(Segment(b.t, INF, Shape.INV_SQRT, 1.0, self.min_ratio, float(tau)))
        return b.segs


@register
@dataclass(frozen=True, repr=False)
class OneCycle(Schedule):
    """The learning-rate part of torch ``OneCycleLR``, as a multiplier of ``max_lr``.

    Starts at ``1 / div_factor``, rises to 1 at step ``pct_start * T - 1``, then anneals to
    ``1 / (div_factor * final_div_factor)`` at step ``T - 1`` (``three_phase``: back to
    ``1 / div_factor`` at ``2 * pct_start * T - 2`` first), with torch's phase boundaries and
    ``anneal_strategy`` ``'cos'`` or ``'linear'``. torch raises past ``T``; this holds the minimum.
    """

    total_steps: int
    pct_start: float = 0.3
    anneal_strategy: str = "cos"
    div_factor: float = 25.0
    final_div_factor: float = 1e4
    three_phase: bool = False
    kind = "one_cycle"

    def __post_init__(self):
        check_steps("total_steps", self.total_steps, allow_zero=False)
        check_float("pct_start", self.pct_start, lo=0, hi=1, lo_open=True, hi_open=True)
        check_choice("anneal_strategy", self.anneal_strategy, ("cos", "linear"))
        check_float("div_factor", self.div_factor, lo=0, lo_open=True)
        check_float("final_div_factor", self.final_div_factor, lo=0, lo_open=True)
        end1 = float(self.pct_start * self.total_steps) - 1
        ends = [end1, 2 * end1 if self.three_phase else None, self.total_steps - 1]
        ends = [e for e in ends if e is not None]
        prev = 0.0
        for e in ends:
            if e <= prev:
                raise ValueError("pct_start * total_steps leaves an empty phase "
                                 f"(total_steps={self.total_steps}, pct_start={self.pct_start})")
            prev = e

    def segments(self):
        init = 1.0 / self.div_factor
        low = init / self.final_div_factor
        end1 = float(self.pct_start * self.total_steps) - 1
        if self.three_phase:
            phases = [(end1, init, 1.0), (2 * end1, 1.0, init),
                      (self.total_steps - 1, init, low)]
        else:
            phases = [(end1, init, 1.0), (self.total_steps - 1, 1.0, low)]
        shape = Shape.COSINE if self.anneal_strategy == "cos" else Shape.LINEAR
        segs, start = [], 0.0
        for end, v0, v1 in phases:
            segs.append(Segment(start, end - start, shape, v0, v1, 1.0))
            start = end
        segs.append(Segment(start, INF, Shape.CONST, low))
        return segs


# -- schedules from the literature --------------------------------------------------------------

@register
@dataclass(frozen=True, repr=False)
class WSD(Schedule):
    """Warmup-Stable-Decay (MiniCPM, arXiv 2404.06395; Hägele et al., arXiv 2405.18392).

    Warmup from ``warmup_start_factor`` to 1 over ``warmup_steps`` (``warmup_shape`` linear |
    cosine ``0.5 (1 - cos(pi p))`` | 1-sqrt ``1 - sqrt(1 - p)``), hold 1 for the stable phase,
    then decay over the decay phase and hold the value the decay ends at. Give either
    ``total_steps`` and one of ``decay_steps`` / ``decay_fraction`` (default 0.1 as in OLMo-core,
    epfml and MiniCPM practice), or ``stable_steps`` and ``decay_steps``. A fraction gives
    ``int(decay_fraction * total_steps)`` decay steps (the float64 product truncated, as epfml's
    ``wsd_schedule`` computes it; ``decay_rounding='round'``: ``round(...)``, as OLMo-core's
    ``WSD`` and fastsched before format version 2). Decay shapes, ``p`` = progress through the
    decay,
    ``x`` = steps into it, ``r = min_ratio``:

    * ``linear`` ``r + (1 - r)(1 - p)``; ``cosine`` ``r + (1 - r) 0.5 (1 + cos(pi p))``;
      ``1-sqrt`` ``r + (1 - r)(1 - sqrt(p))`` (the cooldown Hägele et al. found best, the
      default); ``square`` ``r + (1 - r)(1 - p^2)``; ``power`` ``r + (1 - r)(1 - p^decay_power)``
      (timm). These end at ``r``.
    * ``exp`` ``r^p`` (epfml; geometric, needs ``r > 0``), ends at ``r``.
    * ``exp-half-life`` ``r + (1 - r) 0.5^(x / half_life)`` (MiniCPM); it ends, and then holds,
      at ``r + (1 - r) 0.5^(decay_steps / half_life)``, not at ``r``.

    Matches HF ``get_wsd_schedule`` for the shapes it has when ``warmup_start_factor =
    min_ratio`` (HF's warmup rises from ``min_lr_ratio``), and epfml's ``wsd_schedule`` with
    ``warmup_start_factor = 1 / init_div_factor`` and ``decay_fraction = fract_decay`` (see
    ``docs/porting.md``).
    """

    warmup_steps: int = 0
    total_steps: int | None = None
    decay_steps: int | None = None
    decay_fraction: float | None = None
    stable_steps: int | None = None
    decay_shape: str = "1-sqrt"
    min_ratio: float = 0.0
    warmup_shape: str = "linear"
    warmup_start_factor: float = 0.0
    decay_power: float = 1.0
    half_life: float | None = None
    decay_rounding: str = "floor"
    kind = "wsd"
    # dicts saved before format version 2 rounded the decay length (no decay_rounding field)
    legacy_defaults = {1: {"decay_rounding": "round"}}

    def __post_init__(self):
        w = check_steps("warmup_steps", self.warmup_steps)
        check_choice("decay_rounding", self.decay_rounding, ("floor", "round"))
        check_steps("decay_steps", self.decay_steps, allow_none=True)
        check_steps("stable_steps", self.stable_steps, allow_none=True)
        check_steps("total_steps", self.total_steps, allow_none=True, allow_zero=False)
        check_float("min_ratio", self.min_ratio, lo=0, hi=1)
        check_choice("warmup_shape", self.warmup_shape, WARMUP_SHAPES)
        check_float("warmup_start_factor", self.warmup_start_factor, lo=0)
        _check_decay_shape(self.decay_shape, self.min_ratio, self.half_life, self.decay_power)
        if self.decay_fraction is not None:
            check_float("decay_fraction", self.decay_fraction, lo=0, hi=1)
        if self.total_steps is not None:
            if self.stable_steps is not None:
                raise ValueError("give total_steps or stable_steps, not both")
            if self.decay_steps is not None and self.decay_fraction is not None:
                raise ValueError("give decay_steps or decay_fraction, not both")
            _check_warmup(w, self.total_steps)
            d = self._decay_len()
            if w + d > self.total_steps:
                raise ValueError(f"warmup_steps + decay steps ({w} + {d}) must be <= "
                                 f"total_steps ({self.total_steps})")
        else:
            if self.stable_steps is None or self.decay_steps is None:
                raise ValueError("WSD needs total_steps (with decay_steps or decay_fraction) or "
                                 "both stable_steps and decay_steps")
            if self.decay_fraction is not None:
                raise ValueError("decay_fraction needs total_steps")

    def _decay_len(self) -> int:
        if self.decay_steps is not None:
            return self.decay_steps
        if self.total_steps is None:
            return 0
        frac = 0.1 if self.decay_fraction is None else self.decay_fraction
        if self.decay_rounding == "round":
            return int(round(frac * self.total_steps))
        return int(frac * self.total_steps)

    def segments(self):
        d = self._decay_len()
        stable = (self.stable_steps if self.total_steps is None
                  else self.total_steps - self.warmup_steps - d)
        b = (_Builder().warmup(self.warmup_steps, self.warmup_start_factor, 1.0,
                               self.warmup_shape)
             .add(stable, Shape.CONST, 1.0))
        b.decay(d, 1.0, self.min_ratio, self.decay_shape, power=self.decay_power,
                half_life=self.half_life)
        return b.hold(None if d > 0 else 1.0)


@register
@dataclass(frozen=True, repr=False)
class REX(Schedule):
    """REX (Chen, Wolfe & Kyrillidis, MLSys 2022, arXiv 2107.04197).

    ``f = r + (1 - r) * (1 - p) / (1 - alpha * p)``, ``p = (t - W) / (T - W)``, then ``r``. The
    paper's profile ``(1 - z) / (1/2 + (1/2)(1 - z))`` is ``alpha = 1/2`` (also pytorch_optimizer's
    ``REXScheduler``, with ``r = min_lr / max_lr``). ``alpha = 1 - beta`` is init2winit's
    generalised coefficient (its default ``beta = 0.9`` is ``alpha = 0.1``); ``alpha = 0.9`` is
    the ``REX_LR`` code's ``z / (0.1 + 0.9 z)``, which stays high longer and drops more steeply
    at the end; ``alpha = 0`` is linear decay.
    """

    total_steps: int
    alpha: float = 0.5
    warmup_steps: int = 0
    min_ratio: float = 0.0
    warmup_start_factor: float = 0.0
    kind = "rex"

    def __post_init__(self):
        check_steps("total_steps", self.total_steps, allow_zero=False)
        check_float("alpha", self.alpha, lo=0, hi=1, hi_open=True)
        _check_warmup(self.warmup_steps, self.total_steps)
        check_float("min_ratio", self.min_ratio, lo=0, hi=1)
        check_float("warmup_start_factor", self.warmup_start_factor, lo=0)

    def segments(self):
        return (_Builder().warmup(self.warmup_steps, self.warmup_start_factor, 1.0)
                .add(self.total_steps - self.warmup_steps, Shape.REX, 1.0, self.min_ratio,
                     self.alpha)
                .hold(self.min_ratio))


@register
@dataclass(frozen=True, repr=False)
class Power(Schedule):
    """Power scheduler (Shen et al., IBM, arXiv 2408.13359), as a multiplier of ``lr_max``.

    With ``n = t * tokens_per_step`` tokens seen, ``eta(n) = min(lr_max, batch_size * a * n**b)``
    (the paper's batch-size-agnostic law, ``batch_size`` in sequences); the optimizer's lr is
    ``lr_max`` and this schedule returns ``eta / lr_max``. Linear warmup to ``eta(W)`` over
    ``warmup_steps`` (as dolomite-engine's ``PowerScheduler``); if ``decay_steps > 0`` the last
    ``decay_steps`` of ``total_steps`` decay from ``eta(T - D)`` to ``min_ratio * eta(T - D)`` with
    any :class:`WSD` decay shape (default ``linear``, as the reference implementation; shape
    parameters ``decay_power`` and ``half_life`` as in WSD). Without ``decay_steps`` the power law
    runs for ever (``total_steps`` then only bounds the warmup). Defaults follow the authors'
    code: ``a = 4`` per sequence (every configuration of IBM's dolomite-engine / lm-engine
    ``PowerScheduler``: ``a: 4096`` at batch 1024, ``4608`` at 1152), ``b = -0.51`` and ``lr_max =
    0.02``. Porting from that code: its ``a`` is ``batch_size * a`` here and its ``c`` is
    ``tokens_per_step``. fastsched before format version 2 defaulted to ``a = 4.6``.
    """

    tokens_per_step: float
    batch_size: float
    lr_max: float = 0.02
    a: float = 4.0
    b: float = -0.51
    warmup_steps: int = 0
    total_steps: int | None = None
    decay_steps: int = 0
    decay_shape: str = "linear"
    min_ratio: float = 0.0
    half_life: float | None = None
    decay_power: float = 1.0
    kind = "power"
    legacy_defaults = {1: {"a": 4.6}}

    def __post_init__(self):
        check_float("tokens_per_step", self.tokens_per_step, lo=0, lo_open=True)
        check_float("batch_size", self.batch_size, lo=0, lo_open=True)
        check_float("lr_max", self.lr_max, lo=0, lo_open=True)
        check_float("a", self.a, lo=0, lo_open=True)
        check_float("b", self.b, hi=0, hi_open=True)
        check_steps("warmup_steps", self.warmup_steps)
        check_steps("decay_steps", self.decay_steps)
        check_steps("total_steps", self.total_steps, allow_none=True, allow_zero=False)
        check_float("min_ratio", self.min_ratio, lo=0, hi=1)
        _check_decay_shape(self.decay_shape, self.min_ratio, self.half_life, self.decay_power)
        if self.decay_steps > 0:
            if self.total_steps is None:
                raise ValueError("decay_steps > 0 needs total_steps")
            if self.warmup_steps + self.decay_steps > self.total_steps:
                raise ValueError(f"warmup_steps + decay_steps ({self.warmup_steps} + "
                                 f"{self.decay_steps}) must be <= total_steps "
                                 f"({self.total_steps})")
        elif self.total_steps is not None:
            _check_warmup(self.warmup_steps, self.total_steps)

    def factor(self, step: float) -> float:
        """``min(1, batch_size * a * (step * tokens_per_step) ** b / lr_max)`` (no warmup)."""
        n = step * self.tokens_per_step
        return 1.0 if n <= 0 else min(1.0, self.batch_size * self.a * n ** self.b / self.lr_max)

    def segments(self):
        coef = self.batch_size * self.a / self.lr_max
        w = self.warmup_steps
        b = _Builder().add(w, Shape.LINEAR, 0.0, self.factor(w))
        if self.decay_steps > 0:
            start = self.total_steps - self.decay_steps
            b.add(start - w, Shape.POWER, 1.0, coef, float(w), self.b, self.tokens_per_step)
            top = self.factor(start)
            b.decay(self.decay_steps, top, self.min_ratio * top, self.decay_shape,
                    power=self.decay_power, half_life=self.half_life)
            return b.hold()
        b.segs.append(Segment(b.t, INF, Shape.POWER, 1.0, coef, float(w), self.b,
                              self.tokens_per_step))
        return b.segs


@register
@dataclass(frozen=True, repr=False)
class Infinite(Schedule):
    """Infinite learning-rate schedule for continual pre-training (Ibrahim et al., arXiv
    2403.08763; Janson et al., arXiv 2503.02844).

    Linear warmup to 1 over ``warmup_steps``; cooldown to ``const_ratio``, ending either
    ``cooldown_steps`` after the warmup or at the absolute step ``cooldown_end`` (the papers'
    ``T_cd``; give exactly one); ``cooldown_shape='cosine'``, ``'linear'`` (the authors'
    ``constant_infinite``), or ``'inv-sqrt'``: ``1 + (c - 1) * h(p) / h(1)`` with ``h(q) = 1 /
    sqrt(1 + alpha * q) - 1`` (``alpha = 10`` as in the authors' code, ``timescale=10`` in
    ``infinite_lr``; fastsched before format version 2 defaulted to 8);
    a constant phase of unbounded length; and, if ``anneal_start`` is given, an exponential
    anneal ``c * (min_ratio / c) ** ((t - t_a) / anneal_steps)`` starting at that step, then
    ``min_ratio``. To release a checkpoint, evaluate a copy with ``anneal_start`` set to the
    current step (:meth:`with_anneal`). ``const_ratio`` is required.
    """

    warmup_steps: int
    cooldown_steps: int | None = None
    const_ratio: float | None = None
    cooldown_shape: str = "cosine"
    alpha: float = 10.0
    anneal_start: int | None = None
    anneal_steps: int = 0
    min_ratio: float = 1e-3
    cooldown_end: int | None = None
    kind = "infinite"
    legacy_defaults = {1: {"alpha": 8.0}}

    def __post_init__(self):
        w = check_steps("warmup_steps", self.warmup_steps)
        check_steps("cooldown_steps", self.cooldown_steps, allow_none=True)
        end = check_steps("cooldown_end", self.cooldown_end, allow_none=True)
        if (self.cooldown_steps is None) == (self.cooldown_end is None):
            raise ValueError("give cooldown_steps (a length after the warmup) or cooldown_end "
                             "(the step the cooldown ends at), exactly one")
        if end is not None and end < w:
            raise ValueError(f"cooldown_end must be >= warmup_steps ({w}), got {end}")
        if self.const_ratio is None:
            raise ValueError("const_ratio is required (the constant phase's multiplier)")
        check_float("const_ratio", self.const_ratio, lo=0, lo_open=True, hi=1)
        check_choice("cooldown_shape", self.cooldown_shape, ("cosine", "linear", "inv-sqrt"))
        check_float("alpha", self.alpha, lo=0, lo_open=True)
        check_steps("anneal_steps", self.anneal_steps)
        check_float("min_ratio", self.min_ratio, lo=0, lo_open=True, hi=1)
        if self.anneal_start is not None:
            # the anneal goes down from const_ratio (only checked when there is an anneal)
            check_float("min_ratio", self.min_ratio, lo=0, lo_open=True, hi=self.const_ratio)
            start = check_steps("anneal_start", self.anneal_start)
            if start < self.cooldown_end_step:
                raise ValueError(f"anneal_start must be >= the end of the cooldown "
                                 f"({self.cooldown_end_step}), got {start}")
            if self.anneal_steps < 1:
                raise ValueError("anneal_steps must be an integer >= 1 when anneal_start is set")

    @property
    def cooldown_end_step(self) -> int:
        """The step the cooldown ends at: ``cooldown_end``, or ``warmup_steps + cooldown_steps``."""
        if self.cooldown_end is not None:
            return self.cooldown_end
        return self.warmup_steps + self.cooldown_steps

    def with_anneal(self, start: int, steps: int | None = None) -> Infinite:
        """A copy that anneals from ``start`` (for ``steps``, default ``self.anneal_steps``)."""
        import dataclasses

        return dataclasses.replace(self, anneal_start=start,
                                   anneal_steps=self.anneal_steps if steps is None else steps)

    def segments(self):
        b = _Builder().warmup(self.warmup_steps, 0.0, 1.0)
        cooldown = self.cooldown_end_step - self.warmup_steps
        if self.cooldown_shape == "cosine":
            b.add(cooldown, Shape.COSINE, 1.0, self.const_ratio, 1.0)
        elif self.cooldown_shape == "linear":
            b.add(cooldown, Shape.LINEAR, 1.0, self.const_ratio)
        else:
            b.add(cooldown, Shape.INV_SQRT_CD, 1.0, self.const_ratio, self.alpha)
        if self.anneal_start is None:
            return b.hold(self.const_ratio)
        b.add(self.anneal_start - b.t, Shape.CONST, self.const_ratio)
        b.add(self.anneal_steps, Shape.GEOMETRIC, self.const_ratio, self.min_ratio)
        return b.hold(self.min_ratio)


@register
@dataclass(frozen=True, repr=False)
class Rewarm(Schedule):
    """Re-warming for continual pre-training (Gupta et al., arXiv 2308.04014).

    A sequence of cycles; cycle ``i`` lasts ``cycle_steps[i]`` steps: a linear re-warmup over
    ``warmup_steps[i]`` from ``start_factor`` (``None``: from where the previous cycle ended, 0
    for the first) to ``peaks[i]``, then a decay to ``min_ratio * peaks[i]`` with ``decay_shape``
    (default cosine; Gupta et al. decay to 0.1 of the peak; any :class:`WSD` decay shape, with
    ``decay_power`` and ``half_life`` as there). ``start_factor``, ``peaks`` and the result are
    multipliers of the optimizer's base learning rate. Holds the last value afterwards.
    """

    cycle_steps: tuple[int, ...]
    peaks: tuple[float, ...] | None = None
    warmup_steps: tuple[int, ...] | None = None
    min_ratio: float = 0.1
    decay_shape: str = "cosine"
    start_factor: float | None = 0.0
    half_life: float | None = None
    decay_power: float = 1.0
    kind = "rewarm"

    def __post_init__(self):
        n = len(self.cycle_steps)
        if n < 1:
            raise ValueError("cycle_steps must name at least one cycle")
        object.__setattr__(self, "cycle_steps", tuple(self.cycle_steps))
        peaks = (1.0,) * n if self.peaks is None else tuple(self.peaks)
        warm = (0,) * n if self.warmup_steps is None else tuple(self.warmup_steps)
        for name, seq in (("peaks", peaks), ("warmup_steps", warm)):
            if len(seq) != n:
                raise ValueError(f"{name} must have one entry per cycle ({n}), got {len(seq)}")
        object.__setattr__(self, "peaks", peaks)
        object.__setattr__(self, "warmup_steps", warm)
        for i in range(n):
            steps = check_steps(f"cycle_steps[{i}]", self.cycle_steps[i], allow_zero=False)
            check_float(f"peaks[{i}]", peaks[i], lo=0, lo_open=True)
            w = check_steps(f"warmup_steps[{i}]", warm[i])
            if w > steps:
                raise ValueError(f"warmup_steps[{i}] must be <= cycle_steps[{i}] ({steps}), "
                                 f"got {w}")
        check_float("min_ratio", self.min_ratio, lo=0, hi=1)
        _check_decay_shape(self.decay_shape, self.min_ratio, self.half_life, self.decay_power)
        if self.start_factor is not None:
            check_float("start_factor", self.start_factor, lo=0)

    def segments(self):
        b = _Builder()
        prev_end = 0.0
        for steps, peak, w in zip(self.cycle_steps, self.peaks, self.warmup_steps):
            start = prev_end if self.start_factor is None else self.start_factor
            cycle_start = b.t
            b.warmup(w, start, peak)
            b.decay(steps - w, peak, self.min_ratio * peak, self.decay_shape,
                    power=self.decay_power, half_life=self.half_life)
            prev_end = _end_value(b.segs[-1]) if b.t > cycle_start else start
        return b.hold(prev_end)


@register
@dataclass(frozen=True, repr=False)
class Table(Schedule):
    """Arbitrary values at given steps, linearly interpolated; the first value before the first
    step, the last value after the last. Carries data-driven schedules such as those refined from
    gradient norms (Defazio et al., arXiv 2310.07831)."""

    steps: tuple[float, ...]
    values: tuple[float, ...]
    kind = "table"

    def __post_init__(self):
        steps = tuple(float(s) for s in (self.steps.tolist() if hasattr(self.steps, "tolist")
                                         else self.steps))
        values = tuple(float(v) for v in (self.values.tolist() if hasattr(self.values, "tolist")
                                          else self.values))
        if len(steps) < 1 or len(steps) != len(values):
            raise ValueError(f"steps and values must be non-empty and of equal length, got "
                             f"{len(steps)} and {len(values)}")
        for i, s in enumerate(steps):
            check_float(f"steps[{i}]", s, lo=0)
            if i and s <= steps[i - 1]:
                raise ValueError(f"steps must be strictly increasing; steps[{i}] = {s} follows "
                                 f"{steps[i - 1]}")
        for i, v in enumerate(values):
            check_float(f"values[{i}]", v, lo=0)
        object.__setattr__(self, "steps", steps)
        object.__setattr__(self, "values", values)

    def __repr__(self):
        return f"Table(n={len(self.steps)}, steps=[{self.steps[0]:g}..{self.steps[-1]:g}])"

    def segments(self):
        s, v = self.steps, self.values
        segs = [Segment(0.0, INF, Shape.CONST, v[0])]
        for i in range(len(s) - 1):
            segs.append(Segment(s[i], s[i + 1] - s[i], Shape.LINEAR, v[i], v[i + 1]))
        segs.append(Segment(s[-1], INF, Shape.CONST, v[-1]))
        if s[0] == 0.0:
            segs = segs[1:]
        return segs

    def phase_boundaries(self):
        return []


@register
@dataclass(frozen=True, repr=False)
class Join(Schedule):
    """Schedules end to end: ``schedules[i]`` runs from ``boundaries[i-1]`` on its own clock
    (``t - boundaries[i-1]``), as optax ``join_schedules`` and torch ``SequentialLR``."""

    schedules: tuple[Schedule, ...]
    boundaries: tuple[int, ...]
    kind = "join"

    def __post_init__(self):
        object.__setattr__(self, "schedules", tuple(self.schedules))
        object.__setattr__(self, "boundaries", tuple(self.boundaries))
        if not self.schedules:
            raise ValueError("schedules must not be empty")
        for i, s in enumerate(self.schedules):
            if not isinstance(s, Schedule):
                raise ValueError(f"schedules[{i}] must be a fastsched Schedule, got {s!r}")
        if len(self.boundaries) != len(self.schedules) - 1:
            raise ValueError(f"boundaries must have len(schedules) - 1 = "
                             f"{len(self.schedules) - 1} entries, got {len(self.boundaries)}")
        prev = 0
        for i, bd in enumerate(self.boundaries):
            check_steps(f"boundaries[{i}]", bd, allow_zero=False)
            if bd <= prev:
                raise ValueError(f"boundaries must be strictly increasing and > 0, got "
                                 f"{self.boundaries}")
            prev = bd

    def segments(self):
        starts = (0,) + self.boundaries
        ends = self.boundaries + (INF,)
        out: list[Segment] = []
        for sched, lo, hi in zip(self.schedules, starts, ends):
            out.extend(s.shifted(lo) for s in sched.segments() if s.start + lo < hi)
        return out

    def phase_boundaries(self):
        return sorted(set(self.boundaries) | set(super().phase_boundaries()))


@register
@dataclass(frozen=True, repr=False)
class Scaled(Schedule):
    """``factor * schedule(t)``."""

    schedule: Schedule
    factor: float
    kind = "scaled"

    def __post_init__(self):
        if not isinstance(self.schedule, Schedule):
            raise ValueError(f"schedule must be a fastsched Schedule, got {self.schedule!r}")
        check_float("factor", self.factor, lo=0)

    def segments(self):
        return [s.scaled(self.factor) for s in self.schedule.segments()]

    def phase_boundaries(self):
        return self.schedule.phase_boundaries()

